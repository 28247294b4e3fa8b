"""Learn-then-Test calibration: p-values, fixed-sequence testing, the guarantee on a cache of known risk, the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import agents.calibrate as C
from agents.reinforce import Args as RArgs
from agents.reinforce import train as rtrain
from cee_env import make_synthetic_cache
from cee_env.cache import LayerCache, calib_half


def test_binomial_pvalues_by_hand():
    assert C.binom_pvalue(0, 10, 0.1) == pytest.approx(0.9 ** 10)
    assert C.binom_pvalue(1, 10, 0.1) == pytest.approx(0.9 ** 10 + 10 * 0.1 * 0.9 ** 9)
    assert C.binom_pvalue(0, 100, 0.02) == pytest.approx(0.98 ** 100)
    assert C.binom_pvalue(2, 3, 0.5) == pytest.approx(7 / 8)
    assert C.binom_pvalue(0, 0, 0.1) == 1.0


def test_fixed_sequence_stops_at_the_first_non_rejection():
    assert C.fixed_sequence([0.01, 0.02, 0.5, 0.01], 0.05) == 1  # the 0.01 after the 0.5 is never reached
    assert C.fixed_sequence([0.2, 0.01], 0.05) == -1
    assert C.fixed_sequence([0.01, 0.01], 0.05) == 1
    assert C.min_calibration_size(0.02, 0.1) == math.ceil(math.log(0.1) / math.log(0.98)) == 114
    assert C.binom_pvalue(0, 114, 0.02) <= 0.1 < C.binom_pvalue(0, 113, 0.02)


def known_risk_cache(n: int, rng: np.random.Generator) -> tuple[LayerCache, np.ndarray]:
    """Two layers; layer 2 always predicts 0; a score s ~ U(0, 1) per instance, and layer 1 predicts 1
    (an inconsistency) with probability 1 - s. Exiting at layer 1 when s > t has consistency risk
    E[(1 - s) 1(s > t)] = (1 - t)^2 / 2."""
    s = rng.random(n)
    wrong = rng.random(n) < 1 - s
    p = np.full((n, 2, 2), 0.1)
    p[:, 1, 0] = 0.9
    p[np.arange(n), 0, wrong.astype(int)] = 0.9
    cache = LayerCache(states=np.zeros((n, 2, 1), np.float32), log_probs=np.log(p).astype(np.float32),
                       labels=np.zeros(n, np.int64))
    return cache, np.stack([s, np.zeros(n)], 1)


def test_the_guarantee_holds_on_a_cache_of_known_risk():
    """Calibrate on 300 independent draws: the true risk of the chosen threshold exceeds epsilon in at most
    delta of them (up to binomial noise), and the procedure is not vacuous (it saves layers)."""
    rng = np.random.default_rng(0)
    eps, delta, trials = 0.05, 0.1, 300
    violations, saved = 0, []
    for _ in range(trials):
        cache, score = known_risk_cache(400, rng)
        cal = C.learn_then_test([score], [C.conservative_grid(score)], cache, "consistency", eps, delta)
        assert cal.threshold is not None
        violations += (1 - min(cal.threshold, 1.0)) ** 2 / 2 > eps
        saved.append(cal.saved)
    rate = violations / trials
    assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / trials), rate
    t_star = 1 - math.sqrt(2 * eps)  # where the true risk is exactly epsilon: layer 1 for s > 0.68
    assert 0.5 * (1 - t_star) / 2 < np.mean(saved) <= (1 - t_star) / 2 + 0.02  # saved = P(exit at 1) / 2


def test_too_few_instances_are_refused_with_the_size_needed():
    cache, score = known_risk_cache(50, np.random.default_rng(1))
    cal = C.learn_then_test([score], [C.conservative_grid(score)], cache, "consistency", 0.02, 0.1)
    assert cal.threshold is None and cal.min_n == 114 and cal.n == 50


def test_risks_by_hand():
    p = np.full((3, 2, 2), 0.1)
    p[0, :, 0] = 0.9          # both layers say 0, label 0: no error
    p[1, 0, 1], p[1, 1, 0] = 0.9, 0.9  # layer 1 says 1, full depth 0 (right): both risks
    p[2, 0, 0], p[2, 1, 1] = 0.9, 0.9  # layer 1 says 0 (right), full depth 1 (wrong): inconsistent, no accuracy gap
    cache = LayerCache(states=np.zeros((3, 2, 1), np.float32), log_probs=np.log(p).astype(np.float32),
                       labels=np.zeros(3, np.int64))
    e = np.zeros(3, int)
    assert C.risk_errors(e, cache, "consistency").tolist() == [False, True, True]
    assert C.risk_errors(e, cache, "accuracy_gap").tolist() == [False, True, False]
    assert not C.risk_errors(np.ones(3, int), cache, "consistency").any()


def test_bonferroni_over_paths_keeps_the_most_saving_value():
    cache, score = known_risk_cache(2000, np.random.default_rng(2))
    one = C.learn_then_test([score], [C.conservative_grid(score)], cache, "consistency", 0.05, 0.1)
    two = C.learn_then_test([np.zeros_like(score), score], [[np.inf, 0.5], C.conservative_grid(score)], cache,
                            "consistency", 0.05, 0.1)
    assert two.path == 1 and two.threshold >= one.threshold  # delta / 2 per path: never more aggressive


@pytest.fixture()
def policy_run(tmp_runs):
    cal = make_synthetic_cache(n=600, split="calib", seed=0)
    caches = {"train": calib_half(cal, "calib-a"), "dev": make_synthetic_cache(n=200, split="dev", seed=0)}
    out = rtrain(RArgs(env="cee/Synthetic-v0", epochs=3, alpha=0.05, quiet=True, run_name="cal"), caches)
    return out["run_dir"], cal


def test_cli_calibrates_a_policy_and_predict_uses_it(policy_run, monkeypatch, capsys):
    run, cal = policy_run
    assert json.loads((run / "policy.json").read_text())["train_split"] == "calib-a"
    seen = []

    def fake_cache(task, split, checkpoint, protocol, data_dir):
        seen.append(split)
        return calib_half(cal, split)

    monkeypatch.setattr(C, "calibration_cache", fake_cache)
    rec = C.main(["--run", str(run), "--risk", "consistency", "--epsilon", "0.1", "--delta", "0.2"])
    assert seen == ["calib-b", "calib-a"] and rec["cal_split"] == "calib-b" and rec["n"] == 300  # (calib-a: its rows)
    assert rec["pvalue"] <= 0.2 and json.loads((run / "calibration.json").read_text())["threshold"] == rec["threshold"]
    assert "keeps consistency <= 0.1" in capsys.readouterr().out
    from agents.inference.early_exit_model import load_policy

    policy, _ = load_policy(run)
    assert policy.threshold == pytest.approx(rec["threshold"])
    assert load_policy(run, threshold=0.5)[0].threshold == 0.5  # an explicit threshold wins
    with pytest.raises(SystemExit) as e:  # calibrating on the half it learned on is refused
        C.main(["--run", str(run), "--cal-split", "calib-a"])
    assert e.value.code == 2 and "reuse those rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # too small a calibration set for the epsilon asked
        C.main(["--run", str(run), "--epsilon", "0.001", "--delta", "0.1"])
    assert e.value.code == 2 and "need n >= 2302" in capsys.readouterr().err


def test_a_policy_that_learned_on_all_of_calib_is_refused(tmp_runs, capsys):
    caches = {"train": make_synthetic_cache(n=200, split="calib"), "dev": make_synthetic_cache(n=100, split="dev")}
    run = rtrain(RArgs(env="cee/Synthetic-v0", epochs=1, quiet=True, run_name="all"), caches)["run_dir"]
    with pytest.raises(SystemExit) as e:
        C.main(["--run", str(run)])
    assert e.value.code == 2 and "train it with --train-split calib-a" in capsys.readouterr().err


def test_exits_for_grid_equals_one_threshold_at_a_time():
    rng = np.random.default_rng(3)
    s = rng.random((50, 5))
    grid = [np.inf, 0.9, 0.7, 0.5, 0.2, 0.0]
    e = C.exits_for_grid(s, grid)
    for k, t in enumerate(grid):
        np.testing.assert_array_equal(e[k], C.exits_at(s, t))


def test_rule_grids_are_fixed_before_the_calibration_scores_are_seen():
    """Fixed-sequence testing needs its order set in advance: a rule's grid depends on its score's range only,
    so two calibration sets with different scores are tested along the same thresholds."""
    from agents.policies import LearnedExit, LayerMLPPolicy

    a, b = make_synthetic_cache(split="calib", seed=0), make_synthetic_cache(split="calib", seed=1)
    assert not np.allclose(a.log_probs[:50], b.log_probs[:50])
    policy = LearnedExit(LayerMLPPolicy(a.hidden_size, a.num_layers))
    for rule in ("maxprob", "entropy", "patience", "static", "policy"):
        sa, ga = C.rule_scores(rule, a, policy)
        sb, gb = C.rule_scores(rule, b, policy)
        assert ga == gb and ga[0] == float("inf") and ga == sorted(ga, reverse=True), rule
    # the grid spans the score's whole range, densest near its confident end
    g = C.rule_scores("maxprob", a)[1][1:]
    assert g[0] == 1.0 and g[-1] == pytest.approx(1 / a.num_classes) and g[0] - g[1] < 1e-4
