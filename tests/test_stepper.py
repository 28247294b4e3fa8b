"""agents.policies.stepper: layer-by-layer numpy decisions equal each policy's own (torch / SB3) decisions."""
import numpy as np
import pytest
import torch

from agents.policies import LayerMLPPolicy, LearnedExit
from agents.policies.heuristics import MaxProbExit
from agents.policies.stepper import mlp_from_sequential
from cee_env import make_synthetic_cache
from cee_env.observations import OBS_MODES, obs_size
from tests.test_inference import gap_threshold, tiny  # noqa: F401


@pytest.fixture(scope="module")
def cache():
    return make_synthetic_cache(n=300, num_layers=5, hidden=12, num_classes=3, split="dev", seed=4)


def stepped(policy, cache, drop_every: int = 0) -> np.ndarray:
    """exit mask [N, L-1] from the stepper, one layer at a time; with ``drop_every`` rows leave the batch as in
    inference (every k-th remaining row after each layer), and their decisions read -1 after they left."""
    st = policy.stepper()
    assert st is not None
    n, L = cache.num_instances, cache.num_layers
    out = np.full((n, L - 1), -1)
    rows = np.arange(n)
    st.start(n)
    for l in range(L - 1):
        states = np.asarray(cache.states[rows, l], dtype=np.float32) if st.needs_states else None
        out[rows, l] = st.decide(l, states, np.asarray(cache.log_probs[rows, l], dtype=np.float32))
        if drop_every:
            keep = np.flatnonzero(np.arange(len(rows)) % drop_every != 0)
            rows = rows[keep]
            st.keep(keep)
    return out


def check(policy, cache):
    want = policy.exit_mask(cache)[:, :-1]
    assert 0.05 < want.mean() < 0.95, "decisions should be mixed for the test to mean anything"
    np.testing.assert_array_equal(stepped(policy, cache), want)
    got = stepped(policy, cache, drop_every=3)  # rows leaving the batch keep their own carried features
    seen = got >= 0
    assert seen[:, -1].any() and not seen.all()
    np.testing.assert_array_equal(got[seen], want[seen])


def learned(cache, mode, shared):
    torch.manual_seed(0)
    dim = obs_size(mode, cache.hidden_size, cache.num_layers, cache.num_classes)
    net = LayerMLPPolicy(dim, cache.num_layers, hidden=8, shared=shared, features=mode)
    if shared:
        with torch.no_grad():
            net.layer_emb.normal_(0, 1)
    pol = LearnedExit(net)
    pol.threshold = gap_threshold(pol.exit_probs(cache.states, cache.log_probs)[:, :-1])
    return pol


@pytest.mark.parametrize("mode", OBS_MODES)
@pytest.mark.parametrize("shared", [False, True])
def test_learned_exit_stepper_equals_exit_at_layer(cache, mode, shared):
    check(learned(cache, mode, shared), cache)


@pytest.mark.parametrize("algo", ["ppo", "a2c", "dqn"])
@pytest.mark.parametrize("mode", ["confidence", "state_layer"])
def test_sb3_stepper_equals_exit_at_layer(cache, algo, mode):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import A2C, DQN, PPO

    from agents.sb3 import SB3Exit, cache_obs_stats
    from cee_env import EarlyExitEnv

    env = EarlyExitEnv(cache=cache, obs=mode, obs_bound=50.0)
    cls, kw = {"ppo": (PPO, dict(n_steps=16, batch_size=16)), "a2c": (A2C, {}),
               "dqn": (DQN, dict(buffer_size=100, learning_starts=0))}[algo]
    model = cls("MlpPolicy", env, seed=0, device="cpu", policy_kwargs={"net_arch": [16, 8]}, **kw)
    mean, var = cache_obs_stats(cache, 50.0, mode)
    pol = SB3Exit(model, cache.num_layers, 50.0, mean, var, obs=mode)
    pol.threshold = gap_threshold(pol.exit_probs(cache.states, cache.log_probs)[:, :-1])
    check(pol, cache)
    pol.threshold = None  # the greedy action: SB3's own predict()
    np.testing.assert_array_equal(stepped(pol, cache), pol.exit_mask(cache)[:, :-1])


def test_unknown_modules_have_no_numpy_path():
    from torch import nn

    assert mlp_from_sequential([nn.Linear(3, 2), nn.LayerNorm(2)]) is None
    assert mlp_from_sequential([nn.Tanh()]) is None  # an activation with no linear layer before it
    layers = mlp_from_sequential([nn.Flatten(), nn.Sequential(nn.Linear(3, 4), nn.GELU()), nn.Linear(4, 2)])
    assert [a for *_, a in layers] == ["gelu", "identity"]
    assert MaxProbExit(0.9).stepper() is None  # heuristics keep exit_at_layer


def test_inference_uses_the_stepper_and_gives_the_same_exits(tiny, monkeypatch):
    """EarlyExitClassifier with and without the stepper: the same exits and predictions on raw text."""
    from agents.inference.early_exit_model import EarlyExitClassifier
    from tests.test_inference import mixed_learned

    policy = mixed_learned(tiny["cache"])
    calls = []
    real = policy.stepper
    monkeypatch.setattr(policy, "stepper", lambda: calls.append(1) or real())
    clf = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    texts = (tiny["ds"]["text_a"], tiny["ds"]["text_b"])
    fast = clf.predict(*texts, batch_size=8)
    assert calls
    clf.use_stepper = False
    n = len(calls)
    slow = clf.predict(*texts, batch_size=8)
    assert len(calls) == n
    assert 1 < len(set(fast.exit_layers.tolist()))
    np.testing.assert_array_equal(fast.exit_layers, slow.exit_layers)
    np.testing.assert_array_equal(fast.label_ids, slow.label_ids)


def test_the_stepper_is_built_once_per_policy_and_threshold(tiny, monkeypatch):
    from agents.inference.early_exit_model import EarlyExitClassifier
    from tests.test_inference import mixed_learned

    policy = mixed_learned(tiny["cache"])
    built = []
    real = policy.stepper
    monkeypatch.setattr(policy, "stepper", lambda: built.append(policy.threshold) or real())
    clf = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    texts = list(tiny["ds"]["text_a"])
    first = clf.predict(texts, batch_size=4)
    clf.predict(texts, batch_size=4)
    assert built == [0.5]  # one build for every batch of both calls
    policy.threshold = 0.99  # a new threshold is a new rule: rebuilt, and it exits later
    later = clf.predict(texts, batch_size=4)
    assert built == [0.5, 0.99] and later.exit_layers.mean() > first.exit_layers.mean()
