"""Observation modes: causal, equal to what the heuristics read, and served by the env and the policies alike."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from agents.policies import LayerMLPPolicy, LearnedExit
from agents.policies.heuristics import max_prob, patience_counters, prediction_entropy
from cee_env import EarlyExitEnv, make_synthetic_cache
from cee_env.observations import OBS_MODES, N_CONFIDENCE, obs_size, observe


@pytest.fixture(scope="module")
def cache():
    return make_synthetic_cache(n=64, num_layers=4, num_classes=3, hidden=10, seed=3)


@pytest.mark.parametrize("mode", OBS_MODES)
def test_observations_are_causal_and_sized(cache, mode):
    full = observe(cache.states, cache.log_probs, mode)
    L = cache.num_layers
    assert full.shape == (64, L, obs_size(mode, 10, L, 3)) and full.dtype == np.float32
    for l in range(L):  # layer l's observation from the prefix of layers 1..l only
        prefix = observe(cache.states[:, : l + 1], cache.log_probs[:, : l + 1], mode, num_layers=L)
        np.testing.assert_array_equal(prefix[:, l], full[:, l])


def test_confidence_features_are_what_the_heuristics_read(cache):
    conf = observe(None, cache.log_probs, "confidence")
    L = cache.num_layers
    np.testing.assert_allclose(conf[..., 0], max_prob(cache.log_probs), rtol=1e-6)
    np.testing.assert_allclose(conf[..., 2], prediction_entropy(cache.log_probs) / np.log(3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conf[..., 4] * (L - 1), patience_counters(cache.preds), atol=1e-5)
    assert (conf[..., 1] <= conf[..., 0]).all() and (conf[:, 0, 3] == 0).all() and (conf[:, 0, 5] == 0).all()
    np.testing.assert_allclose(conf[:, 1:, 5], conf[:, :-1, 0])
    np.testing.assert_array_equal(conf[..., N_CONFIDENCE:N_CONFIDENCE + L].argmax(-1), np.arange(L)[None].repeat(64, 0))
    np.testing.assert_allclose(conf[..., N_CONFIDENCE + L:], np.exp(cache.log_probs), rtol=1e-6)
    with pytest.raises(ValueError, match="reads the pooled states"):
        observe(None, cache.log_probs, "state_confidence")
    with pytest.raises(ValueError, match="unknown observation mode"):
        observe(None, cache.log_probs, "probs")


@pytest.mark.parametrize("mode", ["confidence", "state_confidence"])
def test_env_serves_the_new_modes(cache, mode):
    env = EarlyExitEnv(cache=cache, obs=mode)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(options={"index": 5})
    np.testing.assert_array_equal(obs, observe(cache.states, cache.log_probs, mode)[5, 0])
    assert env.observation_space.contains(obs)
    vec = gym.make_vec("cee/Synthetic-v0", num_envs=4, vectorization_mode="vector_entry_point", obs=mode)
    o, _ = vec.reset(seed=0)
    assert o.shape == (4, obs_size(mode, 16, 6, 2)) and vec.single_observation_space.contains(o[0])


@pytest.mark.parametrize("mode", ["confidence", "state_confidence"])
def test_learned_exit_per_layer_equals_whole_cache(cache, mode):
    torch.manual_seed(0)
    net = LayerMLPPolicy(obs_size(mode, 10, 4, 3), 4, hidden=8, features=mode)
    net.set_normaliser(observe(cache.states, cache.log_probs, mode))
    pol = LearnedExit(net, threshold=0.45)
    assert pol.needs_states == (mode == "state_confidence")
    mask = pol.exit_mask(cache)
    for l in range(3):
        st = cache.states[:, : l + 1] if pol.needs_states else None
        np.testing.assert_array_equal(pol.exit_at_layer(l, st, cache.log_probs[:, : l + 1]), mask[:, l])
