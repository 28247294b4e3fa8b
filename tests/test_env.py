import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import cee_env
from cee_env import INFO_KEYS, OBS_MODES, EarlyExitEnv, EarlyExitVectorEnv, LayerCache, make_synthetic_cache

# Tiny hand-made cache: N=3, L=3, C=2, H=4. p(label) per layer:
#   0: label 1, p = .2 .7 .9  -> preds 0 1 1, m = 2
#   1: label 0, p = .6 .8 .9  -> preds 0 0 0, m = 1
#   2: label 1, p = .8 .3 .4  -> preds 1 0 0, m = 3 (last layer wrong)
P_TRUE = np.array([[0.2, 0.7, 0.9], [0.6, 0.8, 0.9], [0.8, 0.3, 0.4]])
LABELS = np.array([1, 0, 1])
MEM = [2, 1, 3]


def tiny_cache(split: str = "train") -> LayerCache:
    probs = np.empty((3, 3, 2))
    probs[np.arange(3), :, LABELS] = P_TRUE
    probs[np.arange(3), :, 1 - LABELS] = 1 - P_TRUE
    states = np.arange(3 * 3 * 4, dtype=np.float32).reshape(3, 3, 4) - 10.0
    return LayerCache(states, np.log(probs).astype(np.float32), LABELS.copy(), task="Tiny", split=split)


def run(env, actions):
    """Reset, step ``actions`` until the episode ends; return the last step's (reward, info) and step count."""
    env.reset(seed=0)
    for k, a in enumerate(actions):
        _, r, term, trunc, info = env.step(a)
        if term:
            return r, info, k + 1
    raise AssertionError("episode did not end")


@pytest.mark.parametrize("obs", OBS_MODES)
def test_checkers_pass(obs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkers' warnings count as failures
        gym_check_env(EarlyExitEnv(cache=make_synthetic_cache(n=32), obs=obs), skip_render_check=True)
        sb3_check_env(EarlyExitEnv(cache=make_synthetic_cache(n=32), obs=obs))
        gym_check_env(EarlyExitEnv(cache=tiny_cache(), obs=obs), skip_render_check=True)


def test_observation_modes_and_bounds():
    c = tiny_cache()
    c.states[0, 0, 0] = 1e3
    for obs, dim in [("state", 4), ("state_layer", 7), ("state_probs", 6)]:
        env = EarlyExitEnv(cache=c, obs=obs, obs_bound=20.0, sequential=True)
        assert env.observation_space.shape == (dim,) and env.observation_space.is_bounded()
        o, _ = env.reset(seed=0)
        assert o.dtype == np.float32 and o[0] == 20.0 and o in env.observation_space
        o2, *_ = env.step(0)
        if obs == "state_layer":
            np.testing.assert_array_equal(o[4:], [1, 0, 0])
            np.testing.assert_array_equal(o2[4:], [0, 1, 0])
        if obs == "state_probs":
            np.testing.assert_allclose(o2[4:], [0.3, 0.7], rtol=1e-5)  # instance 0, layer 2
    assert c.states[0, 0, 0] == 1e3  # clipping never touches the cache


@pytest.mark.parametrize(
    "kind,expect",
    [
        ("vanilla", lambda p, t, m: np.log(p) - 0.1 * t),  # Eq 3
        ("hardness", lambda p, t, m: np.log(p) - 0.1 * t * (1 - m / 3)),  # Eq 4
        ("hardness_weighted", lambda p, t, m: (m / 3) * np.log(p) - (1 - m / 3) * 0.1 * t),
    ],
)
def test_rewards_by_hand(kind, expect):
    env = EarlyExitEnv(cache=tiny_cache(), reward=kind, alpha=0.1, sequential=True)
    for i in range(3):
        for t in (1, 2, 3):
            env.reset(options={"index": i})
            for _ in range(t - 1):
                _, r, term, _, _ = env.step(0)
                assert r == 0.0 and not term
            _, r, term, _, info = env.step(1)
            assert term and info["layer"] == t and info["index"] == i
            assert r == pytest.approx(expect(P_TRUE[i, t - 1], t, MEM[i]), rel=1e-6)


def test_hand_numbers_and_default_reward():
    env = EarlyExitEnv(cache=tiny_cache(), alpha=0.1, sequential=True)
    env.reset(options={"index": 0})
    env.step(0)
    _, r, *_ = env.step(1)
    assert r == pytest.approx(np.log(0.7) - 0.2 * (1 - 2 / 3))  # hardness is the default
    with pytest.raises(ValueError, match="vanilla"):
        EarlyExitEnv(cache=tiny_cache(), reward="bogus")
    with pytest.raises(ValueError, match="state_probs"):
        EarlyExitEnv(cache=tiny_cache(), obs="bogus")


def test_continue_at_last_layer_exits_and_info():
    env = EarlyExitEnv(cache=tiny_cache(), alpha=0.1, reward="vanilla", sequential=True)
    _, info = env.reset(seed=0)
    assert set(INFO_KEYS) <= set(info) and info["layer"] == 1 and info["index"] == 0
    r, info, steps = run(env, [0, 0, 0])
    assert steps == 3 and info["layer"] == 3
    assert r == pytest.approx(np.log(0.9) - 0.3)
    assert info == {"layer": 3, "prediction": 1, "label": 1, "correct": True, "memorized_layer": 2,
                    "log_p_true": pytest.approx(np.log(0.9)), "index": 0}
    with pytest.raises(RuntimeError):
        env.step(0)  # episode over
    env.reset(options={"index": 2})
    _, _, _, _, info = env.step(1)
    assert info["prediction"] == 1 and info["correct"] and info["memorized_layer"] == 3
    env.reset()
    with pytest.raises(ValueError):
        env.step(2)


def test_memorized_override_and_unlabeled():
    c = tiny_cache("test")
    env = EarlyExitEnv(cache=c, memorized=np.array([3, 3, 3]), alpha=0.1)
    assert env.sequential  # non-train split
    env.reset(seed=0)
    _, r, _, _, info = env.step(1)
    assert info["memorized_layer"] == 3 and r == pytest.approx(np.log(0.2))
    c.labels[:] = -1
    _, info = EarlyExitEnv(cache=c).reset(seed=0)
    assert info["log_p_true"] == 0.0 and not info["correct"] and info["memorized_layer"] == 3
    with pytest.raises(ValueError):
        EarlyExitEnv(cache=tiny_cache(), memorized=np.array([0, 1, 2]))


def test_determinism_for_seed():
    def trajectory(seed):
        env = EarlyExitEnv(cache=make_synthetic_cache(n=100), seed=seed)
        rng = np.random.default_rng(1)
        env.reset(seed=seed)
        out = []
        for _ in range(300):
            o, r, term, _, info = env.step(int(rng.integers(2)))
            out.append((o.sum(), r, info["index"], info["layer"]))
            if term:
                env.reset()
        return out

    assert trajectory(3) == trajectory(3)
    assert trajectory(3) != trajectory(4)


def test_dev_split_iterates_in_order():
    env = EarlyExitEnv(cache=make_synthetic_cache(n=5, split="dev"))
    assert env.split == "dev" and env.sequential
    seen = [env.reset(seed=0)[1]["index"]] + [env.reset()[1]["index"] for _ in range(6)]
    assert seen == [0, 1, 2, 3, 4, 0, 1]
    assert env.reset(seed=9)[1]["index"] == 0  # seeding restarts the pass
    assert env.reset(options={"index": 3})[1]["index"] == 3 and env.reset()[1]["index"] == 4
    train = EarlyExitEnv(cache=make_synthetic_cache(n=50))
    ids = [train.reset(seed=0)[1]["index"]] + [train.reset()[1]["index"] for _ in range(20)]
    assert ids != sorted(ids)


def test_vector_matches_single_envs_with_autoreset():
    cache = make_synthetic_cache(n=10, split="dev")
    n, L = 4, cache.num_layers
    venv = EarlyExitVectorEnv(n, cache=cache, alpha=0.1)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    singles = [EarlyExitEnv(cache=cache, alpha=0.1) for _ in range(n)]
    obs, infos = venv.reset(seed=0)
    assert infos["index"].tolist() == [0, 1, 2, 3] and infos["_index"].all()
    for k, e in enumerate(singles):
        o, _ = e.reset(options={"index": k})
        np.testing.assert_array_equal(obs[k], o)
    pointer, autoreset = n, np.zeros(n, bool)
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = rng.integers(0, 2, size=n)
        obs, rew, term, trunc, infos = venv.step(a)
        assert not trunc.any()
        for k, e in enumerate(singles):
            if autoreset[k]:  # NEXT_STEP: this step resets sub-env k, ignoring its action
                assert infos["index"][k] == pointer % 10, "autoresets take the next ids in sub-env order"
                pointer += 1
                o, info = e.reset(options={"index": int(infos["index"][k])})
                r, t = 0.0, False
            else:
                o, r, t, _, info = e.step(int(a[k]))
            np.testing.assert_array_equal(obs[k], o)
            assert rew[k] == pytest.approx(r) and term[k] == t
            for key in INFO_KEYS:
                assert infos[key][k] == pytest.approx(info[key]), key
        autoreset = term.copy()
    assert pointer > 10  # wrapped around at least once


def test_vector_train_split_seeding_and_partial_reset():
    cache = make_synthetic_cache(n=50)
    a = np.random.default_rng(0).integers(0, 2, size=(30, 8))

    def roll(seed):
        v = EarlyExitVectorEnv(8, cache=cache)
        out = [v.reset(seed=seed)[0]]
        out += [v.step(x)[0] for x in a]
        return np.stack(out)

    np.testing.assert_array_equal(roll(1), roll(1))
    v = EarlyExitVectorEnv(8, cache=cache, copy=False)
    v.reset(seed=0)
    mask = np.zeros(8, bool)
    mask[2] = True
    _, infos = v.reset(options={"reset_mask": mask, "indices": [7]})
    assert infos["index"][2] == 7 and infos["layer"][2] == 1
    with pytest.raises(ValueError):
        v.step(np.full(8, 3))


def test_task_branch_calls_get_cache(monkeypatch):
    calls = {}

    def fake_get_cache(**kw):
        calls.update(kw)
        return tiny_cache(kw["split"])

    import cee_env.cache

    monkeypatch.setattr(cee_env.cache, "get_cache", fake_get_cache, raising=False)
    env = gym.make("cee/RTE-v0", split="dev", checkpoint="ckpt")
    assert calls == {"task": "RTE", "split": "dev", "checkpoint": "ckpt", "data_dir": None, "test_file": None}
    assert env.unwrapped.sequential
    venv = gym.make_vec("cee/MRPC-v0", num_envs=2, vectorization_mode="vector_entry_point")
    assert calls["task"] == "MRPC" and calls["split"] == "train" and venv.num_envs == 2
    with pytest.raises(ValueError):
        EarlyExitEnv()


def test_registered_synthetic_envs():
    env = gym.make("cee/Synthetic-v0")
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    _, _, term, _, _ = env.step(1)
    assert term
    envs = gym.make_vec("cee/Synthetic-v0", num_envs=8, vectorization_mode="vector_entry_point")
    assert isinstance(envs.unwrapped, EarlyExitVectorEnv)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (8, 16)
    obs, rew, term, trunc, infos = envs.step(envs.action_space.sample())
    assert rew.shape == (8,) and infos["layer"].shape == (8,)
    assert all(f"cee/{t}-v0" in gym.registry for t in cee_env.TASKS)


def test_synthetic_right_exit_is_difficulty():
    c = make_synthetic_cache(n=200, num_classes=3, seed=5)
    d = c.meta["difficulty"]
    assert (cee_env.memorized_layer(c.preds, c.labels) == d).all()
    env = EarlyExitEnv(cache=c, reward="vanilla", alpha=0.05)
    best = env.tables.reward.argmax(axis=1) + 1
    assert (best == d).all()


def test_non_finite_rewards_are_refused():
    import numpy as np
    import pytest

    from cee_env import EarlyExitEnv, make_synthetic_cache

    c = make_synthetic_cache(n=20, num_layers=3, hidden=8)
    with pytest.raises(ValueError, match="alpha must be a finite"):
        EarlyExitEnv(cache=c, alpha=float("nan"))
    lp = np.array(c.log_probs)
    lp[3, 1, c.labels[3]] = -np.inf  # a damaged log-probability of the gold label
    bad = type(c)(states=c.states, log_probs=lp, labels=c.labels, task="Syn", split="train")
    with pytest.raises(ValueError, match="not finite for instance 3 at layer 2"):
        EarlyExitEnv(cache=bad, reward="hardness")
