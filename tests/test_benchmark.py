"""The benchmark: knobs chosen on calib only, cross-fitted learned methods, tables and the CLI (synthetic caches)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from agents.benchmark import (
    BenchmarkConfig,
    choose,
    choose_path,
    crossfit_scores,
    exits_at,
    main,
    operating_points,
    run_benchmark,
    take,
)
from agents.evaluate import evaluate
from agents.policies import StaticExit
from agents.policies.heuristics import LTEConfig
from cee_env import make_synthetic_cache
from cee_env.cache import LayerCache


def _pt(method, saved, metric, split="calib", knob=None, task="T"):
    return {"task": task, "method": method, "knob": knob if knob is not None else {"v": saved}, "split": split,
            "metric": metric, "saved": saved, "accuracy": metric, "avg_exit": 6 * (1 - saved),
            "metric_name": "accuracy", "num_layers": 6, "n": 10, "exit_hist": []}


def test_choose_by_hand():
    pts = [_pt("m", 0.10, 0.700), _pt("m", 0.30, 0.700), _pt("m", 0.50, 0.695), _pt("m", 0.60, 0.689),
           _pt("m", 0.80, 0.600), _pt("m", 0.30, 0.710)]
    assert choose(pts, 0.70, 0.0)["metric"] == 0.710  # tie on saved -> higher metric
    assert choose(pts, 0.70, 0.01)["saved"] == 0.50  # 0.689 is 1.1 points off
    assert choose(pts, 0.70, 0.2)["saved"] == 0.80
    assert choose(pts, 0.9, 0.01) is None
    assert choose([_pt("m", 0.2, 0.69)], 0.70, 0.01)["saved"] == 0.2  # exactly 1 point: allowed


def test_operating_points_read_calib_only_and_report_every_split():
    pts = [_pt("full", 0.0, 0.70, knob={}), _pt("full", 0.0, 0.60, "dev", knob={}),
           _pt("oracle", 0.5, 0.9, knob={}), _pt("oracle", 0.5, 0.8, "dev", knob={}),
           _pt("maxprob", 0.4, 0.70, knob={"threshold": 0.9}), _pt("maxprob", 0.4, 0.50, "dev", knob={"threshold": 0.9}),
           _pt("maxprob", 0.6, 0.65, knob={"threshold": 0.5}), _pt("maxprob", 0.9, 0.62, "dev", knob={"threshold": 0.5})]
    ops = operating_points(pts, "T", 0.01)
    assert ops["reference_calib"] == 0.70 and ops["splits"] == ["calib", "dev"]
    assert ops["maxprob"]["no_loss"]["knob"] == {"threshold": 0.9}
    assert ops["maxprob"]["no_loss"]["dev"]["metric"] == 0.50  # the dev score of the calib choice, however bad
    assert ops["maxprob"]["max1"]["knob"] == {"threshold": 0.9}  # 0.65 is 5 points off on calib


def test_exits_at_first_score_above_threshold():
    s = np.array([[0.1, 0.9, 0.2], [0.1, 0.1, 0.1], [0.8, 0.1, 0.9]])
    np.testing.assert_array_equal(exits_at(s, 0.5), [1, 2, 0])
    np.testing.assert_array_equal(exits_at(s, np.inf), [2, 2, 2])


def test_crossfit_scores_are_out_of_fold_on_calib_and_refitted_elsewhere():
    calib = make_synthetic_cache(n=40, num_layers=3, hidden=8, split="calib")
    dev = make_synthetic_cache(n=10, num_layers=3, hidden=8, split="dev")
    folds = [np.arange(0, 40, 2), np.arange(1, 40, 2)]
    seen = []

    def fit(train: LayerCache, held: LayerCache, j: int):
        seen.append((j, train.num_instances, held.num_instances))
        return lambda c: np.full((c.num_instances, c.num_layers), float(j))

    s = crossfit_scores(fit, {"calib": calib, "dev": dev}, folds)
    assert seen == [(0, 20, 20), (1, 20, 20), (2, 40, 40)]
    np.testing.assert_array_equal(s["calib"][folds[0]], 0.0)  # scored by the model that did not train on them
    np.testing.assert_array_equal(s["calib"][folds[1]], 1.0)
    np.testing.assert_array_equal(s["dev"], 2.0)  # the deployed rule: one model refitted on all of calib
    np.testing.assert_array_equal(crossfit_scores(fit, {"calib": calib, "dev": dev}, folds, deploy="mean")["dev"], 0.5)
    np.testing.assert_array_equal(take(calib, folds[1]).labels, calib.labels[folds[1]])


def _caches(seed, test=True):
    kw = dict(num_layers=4, hidden=10, seed=seed)
    out = {"calib": make_synthetic_cache(n=96, split="calib", **kw),
           "dev": make_synthetic_cache(n=64, split="dev", **kw)}
    if test:
        out["test"] = make_synthetic_cache(n=64, split="test", **kw)
    return out


def _cfg(tmp_path, name, **kw):
    return BenchmarkConfig(learners=("reinforce:state:hardness", "reinforce:confidence:consistency",
                                     "fqi:confidence:consistency"), alphas=(0.05, 0.2), epochs=1, grid=7,
                           lte=LTEConfig(epochs=2), out=str(tmp_path / name), quiet=True, **kw)


def test_run_benchmark_end_to_end(tmp_runs, tmp_path):
    res = run_benchmark({"SynA": _caches(0), "SynB": _caches(1, test=False)}, _cfg(tmp_path, "bench"))
    out = tmp_path / "bench"
    for f in ("table.md", "results.json", "SynA_curves.png", "SynB_curves.png", "fig4_reward_ablation.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    data = json.loads((out / "results.json").read_text())
    methods = {p["method"] for p in data["points"]}
    assert methods >= {"full", "oracle", "static", "deebert", "maxprob", "pabee", "berxit",
                       "reinforce:state:hardness", "reinforce:state:hardness+paper", "fqi:confidence:consistency"}
    assert {p["split"] for p in data["points"] if p["task"] == "SynA"} == {"calib", "dev", "test"}
    assert {p["split"] for p in data["points"] if p["task"] == "SynB"} == {"calib", "dev"}
    paper = [p for p in data["points"] if p["method"] == "reinforce:state:hardness+paper" and p["split"] == "dev"]
    assert sorted(p["knob"]["alpha"] for p in paper if p["task"] == "SynA") == [0.05, 0.2]
    full = next(p for p in data["points"] if p["method"] == "full" and p["task"] == "SynA" and p["split"] == "test")
    assert full["metric"] == pytest.approx(evaluate(StaticExit(4), _caches(0)["test"]).metric)
    for t in ("SynA", "SynB"):
        ops = res["operating_points"][t]
        for m in ("static", "deebert", "maxprob", "pabee", "berxit"):  # their grids include never exiting early
            assert ops[m]["no_loss"]["calib"]["metric"] >= ops["reference_calib"] - 1e-9
        h = res["headline"][t]
        assert h["heuristic"]["method"] in ("static", "deebert", "maxprob", "pabee")
        assert h["learned"]["method"] in data["learned_methods"] and h["learned"]["method"] != "berxit"
    rc = data["risk_control"]["SynA"]["consistency:0.02:0.1"]
    assert set(rc) >= {"static", "maxprob", "berxit", "reinforce:confidence:consistency"}
    for m, row in rc.items():
        if row["calibration"]["threshold"] is not None:
            assert row["calibration"]["pvalue"] <= 0.1 + 1e-12  # one path per method: delta is not split
        assert 0 <= row["validation"]["violation_frequency"] <= 1 and row["validation"]["reps"] == 200
    assert rc["reinforce:confidence:consistency"]["alpha"] in (0.05, 0.2)
    md = (out / "table.md").read_text()
    assert "## Risk control: consistency <= 0.02 with probability >= 0.9" in md
    assert "## Headline" in md and "| SynA | test |" in md and "| SynA | dev |" in md and "never read while choosing" in md
    # benchmarks.depth_table reads the same results.json: one row per task and backbone, gap = saved difference
    from benchmarks.depth_table import main as depth_main, rows

    head, _ = rows({"bench": data, "again": data}, "test")
    assert len(head) == 2 and all(r.startswith("| SynA |") for r in head)  # SynB has no test split
    h = data["headline"]["SynA"]
    gap = 100 * (h["learned"]["test"]["saved"] - h["heuristic"]["test"]["saved"])
    assert f"| {h['heuristic']['method']} |" in head[0] and f"| {gap:+.1f} |" in head[0]
    assert data["checkpoints"] == {}  # synthetic caches come from no checkpoint
    # the deployed rule is a saved policy: loaded from its run with the chosen threshold it scores what the table says
    from agents.inference.early_exit_model import load_policy
    from backbones.files import resolve_stored

    dep = h["learned"]["deployed"]
    policy, _ = load_policy(resolve_stored(dep["run"]), threshold=dep["threshold"])
    assert dep["threshold"] == h["learned"]["knob"].get("threshold", 0.5)
    for split in ("dev", "test"):
        ev = evaluate(policy, _caches(0)[split])
        assert (ev.metric, ev.saved_layers) == pytest.approx((h["learned"][split]["metric"], h["learned"][split]["saved"]))
    with pytest.raises(SystemExit) as e:
        depth_main(["--benchmarks", str(tmp_path / "nowhere")])
    assert e.value.code == 2


def test_scrambled_test_labels_change_no_choice(tmp_runs, tmp_path):
    """Every knob is chosen on calib: permuting the labels of the test splits changes the test scores, not the choices."""
    caches = _caches(2)
    scrambled = dict(caches)
    rng = np.random.default_rng(0)
    for s in ("dev", "test"):
        c = caches[s]
        scrambled[s] = LayerCache(states=c.states, log_probs=c.log_probs, labels=rng.permutation(np.asarray(c.labels)),
                                  task=c.task, split=c.split, label_names=c.label_names, metric=c.metric)
    a = run_benchmark({"SynA": caches}, _cfg(tmp_path, "a", plots=False))["operating_points"]["SynA"]
    b = run_benchmark({"SynA": scrambled}, _cfg(tmp_path, "b", plots=False))["operating_points"]["SynA"]
    methods = [m for m in a if isinstance(a[m], dict) and "max1" in a[m]]
    assert len(methods) >= 10
    for m in methods:
        for op in ("no_loss", "max1"):
            assert (a[m][op] or {}).get("knob") == (b[m][op] or {}).get("knob"), (m, op)
    assert any(a[m]["max1"]["dev"]["metric"] != b[m]["max1"]["dev"]["metric"] for m in methods if a[m]["max1"])


def test_cli_on_the_synthetic_task(tmp_runs, tmp_path, capsys):
    res = main(["--tasks", "Synthetic", "--alphas", "0.1", "--learners", "reinforce:confidence:consistency",
                "--epochs", "1", "--grid", "5", "--calib-repeats", "2", "--no-plots"])  # the default --out
    out = capsys.readouterr().out
    assert "## Headline" in out and "timing (s):" in out and "caches_s" in out
    default = tmp_runs / "benchmark"  # runs/benchmark (runs/benchmark-<model> for another --model)
    assert (default / "results.json").is_file() and not (default / "Synthetic_curves.png").exists()
    for argv, msg in ((["--test-file", "RTE=x.tsv"], "not in --tasks"), (["--learners", "ppo:state:x"], "ALGO:OBS:REWARD"),
                      (["--calib-folds", "1"], "--calib-folds"), (["--calib-repeats", "0"], "--calib-repeats"),
                      (["--alphas", "nan"], "--alphas"), (["--deploy", "median"], "--deploy must be one of")):
        with pytest.raises(SystemExit) as e:
            main(["--tasks", "Synthetic", "--out", str(tmp_path / "x"), *argv])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_rerun_loads_saved_policies_and_retrains_when_anything_differs(tmp_runs, tmp_path, monkeypatch):
    import agents.fqi
    import agents.reinforce

    caches = {"SynA": _caches(3, test=False)}
    first = run_benchmark(caches, _cfg(tmp_path, "a", plots=False, ltt_resplits=0))

    def refuse(*a, **k):
        raise AssertionError("trained again")

    with monkeypatch.context() as m:
        m.setattr(agents.reinforce, "train", refuse)
        m.setattr(agents.fqi, "train", refuse)
        again = run_benchmark(caches, _cfg(tmp_path, "b", plots=False, ltt_resplits=0))
        assert again["points"] == first["points"]  # every policy loaded, the same scores
        with pytest.raises(AssertionError, match="trained again"):  # different training rows: no reuse
            run_benchmark({"SynA": _caches(4, test=False)}, _cfg(tmp_path, "c", plots=False, ltt_resplits=0))
        with pytest.raises(AssertionError, match="trained again"):
            run_benchmark(caches, _cfg(tmp_path, "d", plots=False, ltt_resplits=0, reuse=False))
    keys = list(tmp_runs.rglob("benchmark_key.json"))
    assert keys
    keys[0].write_text('{"key": "edited"}')  # a stale key: that one policy is trained again, the rest reused
    assert run_benchmark(caches, _cfg(tmp_path, "e", plots=False, ltt_resplits=0))["points"] == first["points"]


def test_risk_control_path_is_chosen_on_the_rows_model_0_learned_on():
    """choose_path reads only "calib_fit" scores: the alpha whose Learn-then-Test there saves the most."""
    fit = make_synthetic_cache(n=400, num_layers=4, hidden=10, seed=5, split="calib")
    L = fit.num_layers
    never = np.zeros((fit.num_instances, L))  # never exits early: passes, saves nothing
    at_last_correct = np.zeros((fit.num_instances, L))
    final = fit.preds[:, -1]
    for i in range(fit.num_instances):  # a score that exits at the first layer agreeing with full depth
        at_last_correct[i, int(np.argmax(fit.preds[i] == final[i]))] = 1.0
    garbage = {"calib": np.full((3, L), np.nan)}  # what fold 0 holds must not matter
    fam = [{"alpha": 0.01, "calib_fit": never, **garbage}, {"alpha": 0.1, "calib_fit": at_last_correct, **garbage}]
    assert choose_path(fam, fit, "consistency", 0.02, 0.1) == 1
    assert choose_path(fam[:1], fit, "consistency", 0.02, 0.1) == 0
    bad = np.ones((fit.num_instances, L))  # exits at layer 1 for everyone: too risky, only "never exit" passes
    assert (fit.preds[:, 0] != final).mean() > 0.05
    assert choose_path([{"alpha": 0.2, "calib_fit": bad}, {"alpha": 0.1, "calib_fit": at_last_correct}], fit,
                       "consistency", 0.02, 0.1) == 1
    assert choose_path([{"alpha": 0.2, "calib_fit": at_last_correct}, {"alpha": 0.1, "calib_fit": at_last_correct}],
                       fit, "consistency", 0.02, 0.1) == 0  # a tie goes to the first path


def test_exit_ceiling_probe_chooses_on_calib_only(tmp_runs, tmp_path, monkeypatch):
    """benchmarks.exit_ceiling: each probe's threshold keeps calib within the drop, and scrambling the test
    labels changes test scores only (same calib rows, same thresholds)."""
    import benchmarks.exit_ceiling as ec

    real = ec.load_caches

    def scrambled(task, cfg, test_file, checkpoint):
        caches = real(task, cfg, test_file, checkpoint)
        c = caches["dev"]
        labels = np.random.default_rng(1).permutation(np.asarray(c.labels))
        caches["dev"] = LayerCache(states=c.states, log_probs=c.log_probs, labels=labels, task=c.task,
                                   split=c.split, label_names=c.label_names, metric=c.metric)
        return caches

    argv = ["--tasks", "Synthetic", "--seeds", "0", "1"]
    a = ec.main([*argv, "--out", str(tmp_path / "a.json")])
    monkeypatch.setattr(ec, "load_caches", scrambled)
    b = ec.main([*argv, "--out", str(tmp_path / "b.json")])
    assert len(a) == 2 * (1 + len(ec.FEATURES) * len(ec.MODELS)) == len(b)
    assert json.loads((tmp_path / "a.json").read_text())["rows"][0]["probe"] == "max probability (Right-Tool)"
    for ra, rb in zip(a, b):
        assert ra["calib"] == rb["calib"]
        assert -0.01 - 1e-9 <= ra["calib"]["change"]
    assert any(ra["test"] != rb["test"] for ra, rb in zip(a, b))
    assert max(r["calib"]["saved"] for r in a) > 0.2  # the synthetic task's confidence is informative


def test_repeated_crossfit_scores_every_calib_row_out_of_fold():
    """A fitter that memorises its training rows (score 1 on them, 0 elsewhere): with several fold splits, no calib
    row may ever see a model that learned on it, while every test row sees the mean of all models."""
    from agents.benchmark import calib_folds, repeated_crossfit

    caches = _caches(3)
    calib = caches["calib"]
    ids = np.arange(calib.num_instances, dtype=float)
    marked = {"calib": LayerCache(states=np.broadcast_to(ids[:, None, None], calib.states.shape).copy(),
                                  log_probs=calib.log_probs, labels=calib.labels, task=calib.task, split="calib",
                                  label_names=calib.label_names, metric=calib.metric),
              "dev": caches["dev"]}
    fold_sets = [calib_folds(marked["calib"], 2, 1000 * r) for r in range(3)]
    assert not all(np.array_equal(fold_sets[0][0], f[0]) for f in fold_sets[1:])  # the splits differ
    calls = []

    def make_fit(r):
        def fit(train, held, j):
            seen = set(train.states[:, 0, 0].astype(int).tolist())
            calls.append((r, j))
            return lambda c: np.array([[1.0 if c.split == "calib" and int(x) in seen else 0.5] * c.num_layers
                                       for x in c.states[:, 0, 0]])
        return fit

    first = {}
    out = repeated_crossfit(make_fit, marked, fold_sets, first)  # refit: 2 fold models + 1 on all of calib
    assert sorted(calls) == [(r, j) for r in range(3) for j in range(3)]
    nested = repeated_crossfit(make_fit, marked, fold_sets, deploy="nested")  # 2 fold models + 2 x 2 inner ones
    assert len(calls) == 9 + 18
    np.testing.assert_array_equal(nested["calib"], 0.5)
    np.testing.assert_array_equal(out["calib"], 0.5)  # never scored by a model trained on the row
    np.testing.assert_allclose(out["dev"], 0.5)
    assert set(first) >= {"calib", "calib_fit", "dev"}
    np.testing.assert_array_equal(first["calib_fit"], 1.0)  # model 0 of split 0 on the rows it learned on


def test_gap_ci_paired_over_instances():
    from agents.benchmark import gap_ci

    L, n = 6, 400
    rng = np.random.default_rng(0)
    heur = rng.integers(1, L + 1, n).astype(np.int8)
    same = {"_exits": heur.copy(), "num_layers": L}
    assert gap_ci(same, {"_exits": heur, "num_layers": L}) == "exact"  # no interval from nothing to resample
    earlier = {"_exits": np.maximum(heur - 1, 1).astype(np.int8), "num_layers": L}  # exits one layer earlier if it can
    lo, hi = gap_ci(earlier, {"_exits": heur, "num_layers": L})
    gap = (heur.mean() - earlier["_exits"].mean()) / L
    assert 0 < lo < gap < hi < 1 / L + 1e-9
    noisy = {"_exits": rng.integers(1, L + 1, n).astype(np.int8), "num_layers": L}  # unrelated rule: wide, around 0
    lo2, hi2 = gap_ci(noisy, {"_exits": heur, "num_layers": L})
    assert lo2 < 0.05 and hi2 > -0.05 and hi2 - lo2 > hi - lo
    assert gap_ci({"num_layers": L}, {"_exits": heur, "num_layers": L}) is None


def test_headline_shows_a_constant_gap_as_exact_not_as_an_interval():
    from agents.benchmark import headline_table

    def pt(saved):
        return {"metric": 0.6, "saved": saved, "metric_name": "accuracy"}

    ops = {"T": {"splits": ["calib", "dev"], "full": {"dev": pt(0.0)}}}
    head = {"learned": {"method": "berxit", "dev": pt(5 / 6)}, "heuristic": {"method": "static", "dev": pt(4 / 6)}}
    exact = headline_table(ops, {"T": {**head, "gap_ci": {"dev": "exact"}}}, ["T"])
    assert "+16.7 (exact: the same on every instance)" in exact and "[+16.7, +16.7]" not in exact
    assert "+16.7 [+10.0, +20.0]" in headline_table(ops, {"T": {**head, "gap_ci": {"dev": [0.1, 0.2]}}}, ["T"])


def test_path_flags_are_checked_before_any_backbone_or_cache(tmp_path, monkeypatch, capsys):
    import agents.benchmark as B

    monkeypatch.setattr(B, "load_caches", lambda *a, **k: pytest.fail("started building before checking the paths"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tsentence1\n0\tonly one column\n")
    (tmp_path / "file").write_text("")
    for argv, msg in ((["--test-file", f"RTE={tmp_path / 'missing.tsv'}"], "--test-file RTE="),
                      (["--test-file", f"RTE={bad}"], "missing column"),
                      (["--checkpoint", f"RTE={tmp_path / 'nockpt'}"], "no such checkpoint folder"),
                      (["--data-dir", str(tmp_path / "nodata")], "--data-dir"),
                      (["--out", str(tmp_path / "file" / "sub")], "is not a writable folder")):
        with pytest.raises(SystemExit) as e:
            B.main(["--tasks", "RTE", *(["--out", str(tmp_path / "o")] if "--out" not in argv else []), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_risk_summary_picks_the_best_methods_on_calib_not_on_test():
    from benchmarks.risk_summary import summary

    def row(calib, redraw, test):
        return {"calibration": {"threshold": 0.5 if calib is not None else None, "saved": calib},
                "validation": {"violation_frequency": 0.05, "mean_population_saved": redraw}, "dev": {"saved": test}}

    rows = {"maxprob": row(0.40, 0.41, 0.30), "deebert": row(0.30, 0.50, 0.60),  # deebert best on test only
            "ppo:confidence:consistency": row(0.45, 0.30, 0.35), "fqi:confidence:consistency": row(None, 0.9, 0.9)}
    res = {"config": {"ltt": ["consistency:0.02:0.1"], "tasks": ["T"]},
           "risk_control": {"T": {"consistency:0.02:0.1": rows}}}
    md = summary(res)
    line = next(ln for ln in md.splitlines() if ln.startswith("| T |"))
    assert "PPO confidence/consistency | 45.0%, 30.0%, 35.0%" in line
    assert "Right-Tool (max prob) | 40.0%, 41.0%, 30.0%" in line and "DeeBERT" not in line and "FQI" not in line
    assert "on 1 of 1 tasks (T)." in md



@pytest.mark.parametrize("deploy", ["nested", "refit", "mean"])
def test_calib_scores_come_from_the_rule_that_is_deployed(deploy):
    """Model j scores every instance 2**j, so a score names the models averaged into it. The calib score the
    knob is chosen on (the headline's calib figure) must come from the same kind of rule as the deployed one
    (test): one model (refit, the default) or the mean of K models (nested); ``mean`` keeps the old mismatch
    (single model on calib, mean of K on test)."""
    from agents.benchmark import calib_folds, crossfit_scores

    caches = _caches(3)
    folds = calib_folds(caches["calib"], 2, 0)
    models = []

    def fit(train, held, j):
        models.append((j, train.num_instances))
        return lambda c: np.full((c.num_instances, c.num_layers), 2.0 ** j)

    out = crossfit_scores(fit, caches, folds, deploy=deploy)
    dev = np.unique(out["dev"])
    calib_by_fold = [np.unique(out["calib"][f]) for f in folds]
    assert len(dev) == 1 and all(len(v) == 1 for v in calib_by_fold)
    n = caches["calib"].num_instances
    if deploy == "nested":  # dev: mean of fold models 0, 1; fold k's calib: mean of its 2 inner models
        assert dev[0] == (1 + 2) / 2
        assert [v[0] for v in calib_by_fold] == [(2 ** 2 + 2 ** 3) / 2, (2 ** 4 + 2 ** 5) / 2]
        assert sorted(j for j, _ in models) == list(range(6))
        assert all(m < n // 2 for j, m in models if j >= 2)  # inner models learn on part of the other fold
    elif deploy == "refit":  # dev: the model refitted on all of calib; calib: single out-of-fold models
        assert dev[0] == 2 ** 2 and (2, n) in models
        assert [v[0] for v in calib_by_fold] == [1, 2]
    else:
        assert dev[0] == 1.5 and [v[0] for v in calib_by_fold] == [1, 2]
