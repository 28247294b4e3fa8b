"""SB3 agents on the early-exit env: env checker, a short PPO run, SB3Exit == model.predict, compare.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agents.evaluate import evaluate, score_exits
from cee_env import EarlyExitEnv, make_synthetic_cache


@pytest.fixture(scope="module")
def caches():
    return {s: make_synthetic_cache(n=256, num_layers=4, hidden=12, split=s, seed=1) for s in ("train", "dev")}


@pytest.fixture(scope="module")
def ppo_run(caches, tmp_path_factory):
    """One short PPO run shared by the tests below (written under a tmp runs dir)."""
    from agents.sb3 import Args, train

    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CEE_RUNS_DIR", str(runs))
        args = Args(algo="ppo", env="cee/Synthetic-v0", reward="vanilla", alpha=0.3, total_timesteps=6_000,
                    n_envs=4, n_steps=128, eval_every=2_000, quiet=True, seed=0)
        out = train(args, caches)
    return out, runs


def random_policy_accuracy(cache, seed: int = 0) -> float:
    """Expected accuracy of exiting with probability 1/2 at each layer."""
    rng = np.random.default_rng(seed)
    exits = np.minimum(rng.geometric(0.5, size=(20, cache.num_instances)), cache.num_layers) - 1
    return float(np.mean([score_exits(e, cache, "random").accuracy for e in exits]))


def test_sb3_check_env_passes_on_state_layer_obs(caches):
    from stable_baselines3.common.env_checker import check_env

    env = EarlyExitEnv(cache=caches["train"], obs="state_layer", seed=0)
    check_env(env, warn=True, skip_render_check=True)
    assert env.observation_space.shape == (12 + 4,)


def test_short_ppo_run_beats_random_policy_and_writes_results(ppo_run, caches):
    out, runs = ppo_run
    dev = caches["dev"]
    learned = evaluate(out["policy"], dev)
    assert learned.accuracy > random_policy_accuracy(dev) + 0.2
    run_dir = out["run_dir"]
    assert run_dir.parent == runs / "sb3"  # its non-default settings (n_envs, ...) add a hash to the name
    assert run_dir.name.startswith("Synthetic-v0-ppo-vanilla-a0.3-s0-")
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["dev"]) == {"static-4", "sb3-ppo", "oracle"}
    assert res["dev"]["sb3-ppo"]["metric"] == pytest.approx(learned.metric)
    assert res["env_steps"] >= 6_000 and len(res["reward_curve"]) > 10
    assert all(len(p) == 2 for p in res["reward_curve"])
    assert (run_dir / "sb3_policy.safetensors").is_file() and (run_dir / "model.zip").is_file()
    tb = runs / "tb" / "sb3" / run_dir.name
    assert any(tb.glob("events.out.tfevents.*"))


def test_sb3_exit_matches_model_predict_on_env_observations(ppo_run, caches):
    """Stepping the dev env with model.predict (on the env's own, normalised observations) exits
    every instance at the layer the evaluator finds with SB3Exit; the saved policy agrees too."""
    from agents.sb3 import SB3Exit

    out, _ = ppo_run
    policy, model, dev = out["policy"], out["model"], caches["dev"]
    env = EarlyExitEnv(cache=dev, obs="state_layer", split="dev")
    stepped = np.zeros(dev.num_instances, dtype=np.int64)
    for i in range(dev.num_instances):
        obs, info = env.reset(options={"index": i})
        done = False
        while not done:
            action, _ = model.predict(policy.normalize(obs[None]), deterministic=True)
            obs, _, done, _, info = env.step(int(action[0]))
        stepped[i] = info["layer"]
    res = evaluate(policy, dev)
    np.testing.assert_array_equal(stepped, res.exit_layers)
    assert 1 < res.avg_exit_layer < dev.num_layers  # a non-trivial policy: it does not always exit at once
    loaded = SB3Exit.load(out["run_dir"])
    np.testing.assert_array_equal(evaluate(loaded, dev).exit_layers, res.exit_layers)


def test_compare_writes_table_json_and_png(caches, tmp_path, monkeypatch):
    from agents.compare import Args, compare

    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path))
    out = compare(Args(env="cee/Synthetic-v0", algos="reinforce,ppo", seeds=2, budget=3_000, reward="vanilla",
                       alpha=0.3, n_envs=4, quiet=True), caches)
    name = "Synthetic-v0-state_layer-vanilla-a0.3-b3000-envs4"  # the settings that differ from the defaults
    d = tmp_path / "compare" / name
    assert (d / "compare.png").stat().st_size > 1000
    res = json.loads((d / "results.json").read_text())
    assert {Path(r["run_dir"]).name for r in res["runs"]} == {f"compare-{name}-{a}-s{s}" for a in ("reinforce", "ppo")
                                                               for s in (0, 1)}
    assert [(r["algo"], r["seed"]) for r in res["runs"]] == [("reinforce", 0), ("reinforce", 1), ("ppo", 0), ("ppo", 1)]
    assert set(res["iqm"]["dev"]) == {"reinforce", "ppo"}
    assert set(res["reference"]["dev"]) == {"full-depth", "oracle"}
    for r in res["runs"]:
        assert r["env_steps"] > 0 and r["reward_curve"] and 0 <= r["dev"]["metric"] <= 1
    for algo, d in res["iqm"]["dev"].items():  # IQM inside its CI, and of 2 seeds the IQM is their mean
        runs = [r["dev"] for r in res["runs"] if r["algo"] == algo]
        for key in ("return", "metric", "saved_layers"):
            lo, hi = d[key]["ci95"]
            assert lo - 1e-9 <= d[key]["iqm"] <= hi + 1e-9 and d[key]["n"] == 2
            assert d[key]["iqm"] == pytest.approx(np.mean([r[key] for r in runs]))
    # the test return is the mean exit reward of the greedy rule: the full-depth one is the mean of the last column
    from cee_env.env import EpisodeTables

    t = EpisodeTables.build(caches["dev"], "vanilla", 0.3, "state", 50.0, None)
    assert res["reference"]["dev"]["full-depth"]["return"] == pytest.approx(t.reward[:, -1].mean())
    rf = res["runs"][0]
    # REINFORCE stops at the budget: at most one update (32 instances x 8 trajectories x L steps) past it.
    assert 3_000 <= rf["env_steps"] < 3_000 + 32 * 8 * caches["train"].num_layers
    # REINFORCE counts every layer decision: between 1 and L steps per trajectory.
    from agents.reinforce import Args as RArgs

    trajectories = rf["updates"] * RArgs.batch_size * RArgs.k
    assert trajectories <= rf["env_steps"] <= trajectories * caches["train"].num_layers

    assert "reinforce" in out["table"] and "ppo" in out["table"]


def test_comparison_names_keep_other_settings_apart():
    """Comparisons of other settings, backbones or checkpoints get their own folders (and runs' folders): one
    never overwrites another's policies or results; the defaults keep the plain env name."""
    from agents.compare import Args, comparison_name

    assert comparison_name(Args()) == "RTE-v0"
    assert comparison_name(Args(env="cee/MCID-v0", obs="confidence", reward="consistency", alpha=0.01)) == \
        "MCID-v0-confidence-consistency-a0.01"
    assert comparison_name(Args(model="all-mpnet-base-v2")) == "RTE-v0-all-mpnet-base-v2"
    assert comparison_name(Args(name="mine", alpha=0.2)) == "mine"
    names = {comparison_name(a) for a in (Args(), Args(alpha=0.02), Args(budget=1000), Args(train_split="train"),
                                          Args(checkpoint="runs/stage1/a"), Args(checkpoint="runs/stage1/b"),
                                          Args(data_dir="/data/x"), Args(n_envs=4))}
    assert len(names) == 8


def test_compare_intervals_are_the_same_for_the_same_runs():
    """rliable resamples with numpy's global RNG whatever random_state says: the intervals are seeded there, and
    the caller's global RNG is left as it was."""
    import numpy as np

    from agents.compare import interval_estimates

    rng = np.random.default_rng(0)
    rows = [{"algo": a, "seed": s, "dev": {"return": float(rng.normal()), "metric": float(rng.random()),
                                           "saved_layers": float(rng.random())}} for a in ("ppo", "dqn") for s in range(5)]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = interval_estimates(rows, "dev")
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.random.rand(7)  # whatever else the process drew in between
    assert interval_estimates(rows, "dev") == first
    lo, hi = first["ppo"]["return"]["ci95"]
    assert lo < first["ppo"]["return"]["iqm"] < hi
