"""benchmarks.inference_speed: the deployed checkpoint by default, both runtimes, an unmeasurable task is an error."""
import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the benchmark times ONNX Runtime: pip install -e '.[fast]' (make setup)")

from benchmarks import inference_speed as B  # noqa: E402
from tests.test_inference import N_DEV, tiny  # noqa: E402,F401

DEPLOYED_RTE = "RTE-all-MiniLM-L6-v2-mean-eq1-s0-holdout0.3"  # the holdout protocol's RTE checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_without_a_checkpoint_the_task_is_an_error_naming_the_deployed_one(tmp_runs, tmp_path, capsys):
    out = tmp_path / "speed.json"
    with pytest.raises(SystemExit) as e:
        B.main(["--tasks", "RTE", "--rules", "static-3", "--out", str(out), "--threads", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert DEPLOYED_RTE in err and "python -m backbones.train --task RTE --holdout 0.3" in err
    assert not out.exists() or not json.loads(out.read_text())["complete"]


def test_no_policy_run_times_the_deployed_checkpoint_in_both_runtimes(tiny, tmp_runs, tmp_path, capsys):
    from backbones.train import TrainConfig

    deployed = tmp_runs / "stage1" / DEPLOYED_RTE
    shutil.copytree(tiny["ckpt"], deployed)  # stands in for the protocol's RTE checkpoint
    (deployed / "metrics.json").write_text("{}")
    (deployed / "train_config.json").write_text(json.dumps(asdict(TrainConfig(task="RTE", holdout=0.3).resolved())))
    out = tmp_path / "speed.json"
    B.main(["--tasks", "RTE", "--dev-file", str(tiny["dev"]), "--rules", "static-2", "patience:1",
            "--batch-sizes", "1", "4", "--repeats", "1", "--threads", "1", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert rec["complete"] and [r["task"] for r in rec["results"]] == ["RTE"]
    pols = rec["results"][0]["policies"]
    assert set(pols) == {"static-2", "pabee-1"}
    for p in pols.values():
        assert p["checkpoint"].endswith(DEPLOYED_RTE)
        for bs in ("1", "4"):
            b = p["batch"][bs]
            assert set(b["seconds"]) == {"torch:full", "torch:full-hf", "torch:ee", "torch:ee-never",
                                         "onnx:full", "onnx:ee", "onnx:ee-never"} | ({"onnx:ee-known"} if bs == "1" else set())
            assert set(b["sum_of_batch_minima_seconds"]) == set(b["seconds"])
            if bs == "1":  # the chain told the evaluator's exits: early exit's log-probabilities, and what it costs
                assert b["onnx_known_exits_max_abs_log_prob_diff_vs_ee"] < 1e-5
                o = b["runtime"]["onnx"]
                assert o["decision_cost"] == pytest.approx(b["seconds"]["onnx:ee"] / b["seconds"]["onnx:ee-known"] - 1)
            for rt in ("torch", "onnx"):
                assert b["agree_with_evaluator"][rt] == {"preds": N_DEV, "exit_layers": N_DEV, "n": N_DEV}
                r = b["runtime"][rt]
                assert r["ratio_to_predicted"] == pytest.approx(r["speedup"] / p["predicted_speedup"])
                assert r["speedup"] == pytest.approx(b["seconds"][f"{rt}:full"] / b["seconds"][f"{rt}:ee"])
            assert b["onnx_vs_torch_max_abs_log_prob_diff"] < 1e-4
    assert np.isclose(pols["static-2"]["predicted_speedup"], 3 / 2)
    assert "onnx full depth is" in capsys.readouterr().out


def test_a_runtime_it_does_not_know_is_a_usage_error(tmp_runs, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--tasks", "RTE", "--runtime", "tvm"])
    assert e.value.code == 2 and "--runtime takes one or more of torch, onnx" in capsys.readouterr().err


def test_from_benchmark_times_the_headline_rules_and_checks_their_dev_figures(tiny, tmp_runs, tmp_path, capsys):
    """--from-benchmark: the benchmark's deployed learned run with its calib-chosen threshold and its best heuristic
    (every heuristic's knob maps to the rule that exits where the benchmark's score threshold does)."""
    from agents.benchmark import exits_at, heuristic_scores
    from agents.evaluate import evaluate, score_exits
    from backbones.cli import UserError
    from tests.test_inference import mixed_learned, save_run

    cache = tiny["cache"]
    policy = mixed_learned(cache)
    thr = 0.3
    run = save_run(tiny, tmp_path / "run", policy, threshold=0.5)

    def point(ev):
        return {"metric": ev.metric, "saved": ev.saved_layers}

    scores = heuristic_scores(cache)
    for method, knob in (("maxprob", {"threshold": float(np.median(scores["maxprob"]))}),
                         ("deebert", {"threshold": float(np.median(scores["deebert"]))}),
                         ("pabee", {"threshold": 0.5}), ("pabee", {"threshold": float("inf")}), ("static", {"k": 2})):
        want = (score_exits(exits_at(scores[method], knob["threshold"]), cache, method) if method != "static"
                else evaluate(B.parse_rule("static-2"), cache))
        head = {"learned": {"method": "ppo:confidence:consistency", "knob": {"alpha": 0.02, "threshold": thr},
                            "deployed": {"run": str(run), "threshold": thr}, "dev": point(evaluate(
                                type(policy)(policy.net, thr), cache))},
                "heuristic": {"method": method, "knob": knob, "dev": point(want)}}
        res = tmp_path / "results.json"
        res.write_text(json.dumps({"headline": {"RTE": head}, "checkpoints": {"RTE": str(tiny["ckpt"])}}))
        got = B.benchmark_policies("RTE", res, lambda ckpt: cache)  # raises if a rule scores otherwise
        assert [k for k, *_ in got] == ["learned:ppo:confidence:consistency", f"heuristic:{method}"]
        assert got[0][1].threshold == thr and all(c == tiny["ckpt"] for *_, c in got)
    head["heuristic"]["dev"]["saved"] += 0.01  # the benchmark said something else: its run or checkpoint changed
    res.write_text(json.dumps({"headline": {"RTE": head}, "checkpoints": {"RTE": str(tiny["ckpt"])}}))
    with pytest.raises(UserError, match="changed since"):
        B.benchmark_policies("RTE", res, lambda ckpt: cache)
    head["learned"]["deployed"] = None
    res.write_text(json.dumps({"headline": {"RTE": head}, "checkpoints": {"RTE": str(tiny["ckpt"])}}))
    with pytest.raises(UserError, match="no single saved policy"):
        B.benchmark_policies("RTE", res)
    with pytest.raises(UserError, match="has no MRPC"):
        B.benchmark_policies("MRPC", res)
    # end to end: both rules timed in both runtimes on the benchmark's checkpoint
    head["learned"]["deployed"] = {"run": str(run), "threshold": thr}
    res.write_text(json.dumps({"headline": {"RTE": head}, "checkpoints": {"RTE": str(tiny["ckpt"])}}))
    out = tmp_path / "speed.json"
    B.main(["--tasks", "RTE", "--dev-file", str(tiny["dev"]), "--from-benchmark", str(res), "--batch-sizes", "4",
            "--repeats", "1", "--threads", "1", "--out", str(out)])
    pols = json.loads(out.read_text())["results"][0]["policies"]
    assert set(pols) == {"learned:ppo:confidence:consistency", "heuristic:static"}
    # the learned rule decided inside ONNX Runtime's graphs, the static rule reads no outputs
    assert pols["learned:ppo:confidence:consistency"]["onnx_decisions"] == "graph"
    assert pols["heuristic:static"]["onnx_decisions"] == "numpy"
    B.main(["--table", str(out)])  # the docs' table, rendered from the saved JSON without timing anything
    table = capsys.readouterr().out.splitlines()
    rows = [l for l in table if l.startswith("| RTE |")]
    assert len(rows) == 2 and "| learned: ppo:confidence:consistency | graph |" in rows[0]
    assert all(r.endswith("| yes |") for r in rows) and "interleaved by pass" in table[-1]
    for p in pols.values():
        assert p["batch"]["4"]["agree_with_evaluator"]["onnx"] == {"preds": N_DEV, "exit_layers": N_DEV, "n": N_DEV}


@pytest.mark.parametrize("by", ["pass", "batch"])
def test_interleaving_by_pass_keeps_each_variants_pass_whole_and_by_batch_alternates(by):
    calls = []
    variants = {k: (lambda b, k=k: calls.append((k, b))) for k in ("a", "b", "c")}
    wall, cpu, per = B.time_interleaved(variants, [0, 1, 2, 3], repeats=2, by=by)
    assert {k: len(v) for k, v in wall.items()} == {"a": 2, "b": 2, "c": 2} and set(cpu) == set(wall) == set(per)
    for k in "abc":  # each pass's batches add up to the pass
        assert [len(p) for p in per[k]] == [4, 4] and np.allclose([sum(p) for p in per[k]], wall[k])
    assert len(calls) == 3 * 4 * 3 and all(calls.count((k, b)) == 3 for k in "abc" for b in range(4))
    runs = [k for i, (k, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != k]  # who ran, in turns
    if by == "pass":  # whole passes, the starting variant rotating with the repeat
        assert runs == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    else:  # every batch by every variant in turn
        assert len(runs) == len(calls)
    with pytest.raises(ValueError, match="by must be one of"):
        B.time_interleaved(variants, [0], 1, by="row")


def test_sum_of_minima_takes_each_batchs_fastest_pass():
    assert B.sum_of_minima([[1.0, 5.0, 2.0], [3.0, 2.0, 2.5]]) == pytest.approx(1.0 + 2.0 + 2.0)


def test_interleave_and_decisions_flags_are_checked(tmp_runs, capsys):
    for flag, value in (("--interleave", "row"), ("--decisions", "gpu")):
        with pytest.raises(SystemExit) as e:
            B.main(["--tasks", "RTE", flag, value])
        assert e.value.code == 2 and f"{flag} takes one of" in capsys.readouterr().err
