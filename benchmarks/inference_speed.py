"""Early-exit inference speed: does skipping layers save the time it promises, against the fastest full depth?

For each task's dev set, each batch size (default 1 and 32) and each runtime of ``--runtime``
(default both), wall time of

- ``torch:full``:     PyTorch eager, full depth through the layer-by-layer loop, last classifier only
- ``torch:full-hf``:  PyTorch eager, full depth through the encoder's own (Hugging Face) forward
- ``torch:ee``:       :class:`agents.inference.early_exit_model.EarlyExitClassifier` with the policy
  (every layer's classifier, the policy, rows leaving the batch as they exit)
- ``onnx:full``:      ONNX Runtime, the whole full-depth model exported as one graph (the fastest
  full-depth option a user has here)
- ``onnx:ee``:        :class:`agents.inference.onnx_runtime.OnnxEarlyExitClassifier`: the same early exit
  with the embeddings and every layer + pooling + classifier a graph of its own
- ``<runtime>:ee-never``: the early-exit loop with a policy that never exits (its overhead at full
  depth: every layer's classifier, a policy call, one graph per layer)

Tokenisation and padding happen before timing, identically for all; with batch
size > 1 the dev set is sorted by length first (for all). Each figure is the median
of ``--repeats`` passes over the dev set after one warm-up pass; the variants take
turns pass by pass (``--interleave pass``: each keeps its weights in the CPU's caches
through its pass, as a deployment serving one model does) or batch by batch
(``--interleave batch``: background load hits all alike, but each variant's weights
are evicted by the others' before each of its batches).
Process CPU time is recorded too (robust to other processes on a busy machine;
with 1 thread it is the compute time). Speed-up in a runtime = t(full depth in that runtime) /
t(early exit in it) in wall time (for onnx: against the whole-model graph); the speed-up the saved
layers predict is L / average exit layer; the ratio of the two should be >= 0.9 at batch 1 and
>= 0.85 at batch 32. Also reported: the token-weighted prediction L * sum(len) / sum(len * exit)
(compute grows with tokens, and long instances tend to exit later) and the ratio to it,
which isolates the implementation's overhead from that property of the data. Also checked: the
early-exit predictions and exit layers of each runtime equal what the evaluator
(agents.evaluate over the layer cache) reports for the same policy, and the largest difference
of ONNX Runtime's log-probabilities from PyTorch's.

Policies: ``--policy-run DIR`` (a trained policy run of agents.reinforce or agents.sb3;
``TASK=DIR`` for one task) and the rules of ``--rules``; without a policy run the rules
default to ``static-3`` and ``maxprob:auto`` (a max-probability threshold chosen on the
calib cache so that about half of the layers are saved) on each task's deployed checkpoint
(the protocol's: ``cee_env.cache.deployed_checkpoint``). A task that cannot be measured (no
trained checkpoint, no policy) is an error, not a skipped task.

    python -m benchmarks.inference_speed [--tasks RTE MRPC] [--policy-run DIR] [--runtime torch onnx] [--out PATH]
    python -m benchmarks.inference_speed --table runs/benchmarks/inference_speed.json   # docs' markdown table
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from agents.inference import RUNTIMES
from agents.inference.early_exit_model import EarlyExitClassifier, full_depth_logits
from agents.evaluate import evaluate
from agents.policies import ExitPolicy
from agents.policies.heuristics import MaxProbExit
from agents.predict import parse_rule
from backbones.cli import Repeatable, UserError, parse, user_errors
from backbones.files import write_json

TARGETS = {1: 0.9, 32: 0.85}  # ratio measured / predicted speed-up, by batch size
INTERLEAVE = ("pass", "batch")
DEFAULT_RULES = ["static-3", "maxprob:auto"]


class NeverExit(ExitPolicy):
    """Continue at every layer (the last one exits anyway): the generic early-exit loop at full depth."""

    name = "never"
    needs_states = False

    def exit_at_layer(self, l, states, log_probs):
        return np.zeros(np.asarray(log_probs).shape[0], dtype=bool)


def calibrate_maxprob(cache, target_saved: float = 0.5) -> MaxProbExit:
    """The max-probability threshold whose average exit layer on ``cache`` is closest to saving ``target_saved``."""
    best = None
    for thr in np.round(np.linspace(0.5, 0.999, 500), 4):
        ev = evaluate(MaxProbExit(thr), cache)
        gap = abs(ev.saved_layers - target_saved)
        if best is None or gap < best[0] - 1e-9:
            best = (gap, thr)
    return MaxProbExit(float(best[1]))


def _run_task(run: Path) -> str | None:
    for name in ("policy.json", "sb3_policy.json"):
        if (run / name).is_file():
            return json.loads((run / name).read_text()).get("task")
    return None


def heuristic_rule(method: str, knob: dict) -> str:
    """agents.predict's rule string for a benchmark heuristic and its knob: the benchmark thresholds the same
    scores as agents.calibrate, so its knob_value converts them (PABEE's +inf, never exit early, is patience 0)."""
    from agents.calibrate import knob_value

    if method == "static":
        return f"static-{int(knob['k'])}"
    rule = {"maxprob": "maxprob", "deebert": "entropy", "pabee": "patience"}.get(method)
    if rule is None:
        raise UserError(f"unknown heuristic {method!r} in the benchmark's results")
    t = float(knob["threshold"])
    return "patience:0" if rule == "patience" and math.isinf(t) else knob_value(rule, t)


def benchmark_policies(task: str, path: str | Path, dev_cache_for=None) -> list[tuple[str, object, str, Path]]:
    """The headline rules of an ``agents.benchmark`` results.json for ``task``: the best learned policy (its
    deployed run, with the exit threshold chosen on calib) and the best heuristic (its knob chosen on calib),
    on the checkpoint the benchmark used. With ``dev_cache_for(checkpoint)`` (the task's dev cache), each rule
    must score on it what the benchmark reported for dev (else its run or checkpoint changed since)."""
    from backbones.files import read_json, resolve_stored

    fix = f"--from-benchmark {path}: pass the results.json written by python -m agents.benchmark"
    try:
        res = read_json(path, fix)
    except FileNotFoundError:
        raise UserError(f"--from-benchmark {path}: no such file") from None
    head = {t.lower(): h for t, h in res.get("headline", {}).items()}.get(task.lower())
    if head is None:
        raise UserError(f"--from-benchmark {path} has no {task} (it has {', '.join(res.get('headline', {})) or 'none'});"
                        f" run python -m agents.benchmark --tasks {task}")
    ck = {t.lower(): c for t, c in res.get("checkpoints", {}).items()}.get(task.lower())
    if ck is None:
        raise UserError(f"--from-benchmark {path} records no checkpoint for {task}; rerun agents.benchmark")
    ckpt = resolve_stored(ck)
    out = []
    learned, heur = head.get("learned"), head.get("heuristic")
    if learned:
        dep = learned.get("deployed")
        if not dep:
            raise UserError(f"--from-benchmark {path}: {task}'s best learned rule ({learned['method']}) is no single "
                            "saved policy (it needs agents.benchmark's default --deploy refit, one calib repeat)")
        clf = EarlyExitClassifier.from_run(resolve_stored(dep["run"]), threshold=dep["threshold"], checkpoint=ckpt)
        out.append((f"learned:{learned['method']}", clf.policy,
                    f"{learned['method']} (benchmark's best learned on calib; deployed run {dep['run']}, threshold "
                    f"{dep['threshold']:g})", ckpt))
    if heur:
        rule = heuristic_rule(heur["method"], heur["knob"])
        out.append((f"heuristic:{heur['method']}", parse_rule(rule), f"rule {rule} (benchmark's best heuristic on calib)",
                    ckpt))
    if dev_cache_for is None:
        return out
    dev = dev_cache_for(ckpt)
    for (key, policy, _, _), h in zip(out, [x for x in (learned, heur) if x]):
        ev, want = evaluate(policy, dev), h.get("dev")
        if want and (abs(ev.metric - want["metric"]) > 1e-9 or abs(ev.saved_layers - want["saved"]) > 1e-9):
            raise UserError(f"--from-benchmark {path}: {task} {key} scores {100 * ev.metric:.2f} at "
                            f"{100 * ev.saved_layers:.1f}% saved on dev, the benchmark {100 * want['metric']:.2f} at "
                            f"{100 * want['saved']:.1f}%: its run or checkpoint changed since; rerun agents.benchmark")
    return out


def load_policies(task: str, args, default_ckpt, cache_for) -> list[tuple[str, object, str, Path]]:
    """(key, policy, description, checkpoint) for this task."""
    out = []
    if args.from_benchmark:  # (its dev figures are checked unless another dev file is timed)
        out = benchmark_policies(task, args.from_benchmark, None if args.dev_file else cache_for)
    for r in args.policy_run:
        prefix, sep, path = r.partition("=")
        run = Path(path if sep else r)
        if sep and prefix.lower() != task.lower():
            continue
        if not sep and (t := _run_task(run)) and t.lower() != task.lower():
            continue  # a run trained on another task
        clf = EarlyExitClassifier.from_run(run, checkpoint=args.checkpoint)
        thr = getattr(clf.policy, "threshold", None)
        desc = f"trained policy from {run}" + (f" (threshold {thr:g})" if thr is not None else "")
        out.append((f"{clf.policy.name}:{run.name}", clf.policy, desc, clf.checkpoint))
    given = bool(out)
    rules = args.rules if args.rules is not None else ([] if given else DEFAULT_RULES)
    if not rules:
        return out
    note = "" if given else " (no trained policy given)"
    ckpt = Path(args.checkpoint) if args.checkpoint else default_ckpt()
    for rule in rules:
        if rule.lower() == "maxprob:auto":
            from cee_env.cache import get_cache

            p = calibrate_maxprob(get_cache(task, "calib", checkpoint=ckpt, verbose=False), args.target_saved)
            desc = (f"max-prob rule, threshold {p.threshold:g} chosen on the calib cache to save "
                    f"~{100 * args.target_saved:.0f}% of layers{note}")
        else:
            p = parse_rule(rule)
            desc = f"rule {rule}{note}"
        out.append((p.name, p, desc, ckpt))
    return out


def time_interleaved(variants: dict, batches: list, repeats: int, by: str = "pass") -> tuple[dict, dict, dict]:
    """Wall and CPU seconds per pass over ``batches`` for each variant (lists of ``repeats`` values), and each
    batch's wall seconds in each pass (``repeats`` lists of ``len(batches)``).

    ``by="pass"``: each variant makes a whole pass over the batches, the variants one after another
    in an order rotating with the repeat: what a deployment that serves one model sees (its
    weights stay in the CPU's caches from one request to the next). ``by="batch"``: every batch is
    run by every variant back to back (in an order rotating with the batch), so slow changes in
    background load hit all variants alike, but each variant's weights are evicted from the caches
    by the others' before each of its batches (see docs/inference_speed.md). Pass 0 is a warm-up
    and not recorded.
    """
    if by not in INTERLEAVE:
        raise ValueError(f"by must be one of {INTERLEAVE}; got {by!r}")
    names = list(variants)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    per_batch = {k: [] for k in names}
    pc = time.perf_counter
    for r in range(repeats + 1):
        w = {k: [0.0] * len(batches) for k in names}
        c = dict.fromkeys(names, 0.0)
        if by == "pass":
            j = r % len(names)
            for k in names[j:] + names[:j]:
                f, wk, c0 = variants[k], w[k], time.process_time()
                for i, inputs in enumerate(batches):
                    t0 = pc()
                    f(inputs)
                    wk[i] = pc() - t0
                c[k] = time.process_time() - c0
        else:
            for i, inputs in enumerate(batches):
                j = (i + r) % len(names)
                for k in names[j:] + names[:j]:
                    c0, t0 = time.process_time(), pc()
                    variants[k](inputs)
                    w[k][i] = pc() - t0
                    c[k] += time.process_time() - c0
        if r > 0:
            for k in names:
                wall[k].append(sum(w[k]))
                cpu[k].append(c[k])
                per_batch[k].append(w[k])
    return wall, cpu, per_batch


def sum_of_minima(per_batch: list[list[float]]) -> float:
    """Each batch's fastest time over the passes, summed: the estimate that ignores a batch slowed by something
    else on the machine (interference only ever adds time; timeit's documentation makes the same argument for
    the minimum), while each pass keeps its own cache state."""
    return float(np.min(np.asarray(per_batch, dtype=np.float64), axis=0).sum())


def bench_task(task: str, args, on_progress=None) -> dict:
    """Time every policy of ``task`` in every runtime of ``args.runtime``; a task that cannot be measured
    (no checkpoint, no policy) raises (``FileNotFoundError`` / :class:`UserError`)."""
    from backbones import tasks as T
    from cee_env.cache import deployed_checkpoint, get_cache

    spec = T.get_task(task)
    caches: dict[str, object] = {}

    def default_ckpt() -> Path:  # the checkpoint the protocol deploys (the one the benchmark's policies learn on)
        if args.checkpoint:
            return Path(args.checkpoint)
        return deployed_checkpoint(spec.name, train_missing=args.train_missing)

    def cache_for(ckpt: Path):
        if str(ckpt) not in caches:
            caches[str(ckpt)] = get_cache(spec.name, "dev", checkpoint=ckpt, data_file=args.dev_file, verbose=False)
        return caches[str(ckpt)]

    policies = load_policies(spec.name, args, default_ckpt, cache_for)
    if not policies:
        raise UserError(f"nothing to time on {spec.name}: no --policy-run is for this task and --rules is empty")
    ds = T.load_split(spec, "dev", path=args.dev_file)
    if args.limit:
        ds = ds.select(range(min(args.limit, len(ds))))
    result = {"task": spec.name, "n": len(ds), "policies": {}}
    for key, policy, desc, ckpt in policies:
        result["policies"][key] = bench_policy(spec.name, ds, policy, desc, ckpt, cache_for(ckpt), args)
        if on_progress is not None:
            on_progress(result)
    return result


def bench_policy(task: str, ds, policy, desc: str, ckpt: Path, cache, args) -> dict:
    """One policy on one dev set: each runtime's full depth and early exit, at each batch size."""
    clf = EarlyExitClassifier.from_checkpoint(ckpt, policy)
    model, L = clf.model, clf.num_layers
    clfs = {"torch": clf}
    if "onnx" in args.runtime:
        from agents.inference.onnx_runtime import OnnxEarlyExitClassifier, load_graphs

        clfs["onnx"] = OnnxEarlyExitClassifier(model, clf.tokenizer, policy, load_graphs(ckpt, model, args.threads),
                                               decisions=args.decisions)
    ev = evaluate(policy, cache)
    n = len(ds)
    ev_exits, ev_preds = ev.exit_layers[:n], ev.preds[:n]
    avg_exit = float(ev_exits.mean())
    feats = clf.tokenize(ds["text_a"], ds["text_b"])
    lens = np.array([len(f["input_ids"]) for f in feats], dtype=np.float64)
    # compute ~ tokens x layers (attention's T^2 term is small at these lengths): long instances that
    # exit late save less than their layer count says
    tok_pred = L * lens.sum() / (lens * ev_exits).sum()
    pred = L / avg_exit
    pres = {"description": desc, "checkpoint": str(ckpt), "num_layers": L, "avg_exit_layer": avg_exit,
            "predicted_speedup": pred, "predicted_speedup_token_weighted": tok_pred,
            f"dev_{ev.metric_name}": ev.metric, "runtimes": list(args.runtime), "batch": {}}
    if "onnx" in clfs:
        pres["onnx_decisions"] = "numpy" if clfs["onnx"].decision_graphs() is None else "graph"
    print(f"\n{task} [{policy.name}]: {desc}\n  checkpoint {ckpt}; dev {ev.metric_name} {100 * ev.metric:.1f} at "
          f"avg exit {avg_exit:.2f}/{L} -> predicted speed-up {pred:.2f}x ({tok_pred:.2f}x token-weighted)")
    for bs in args.batch_sizes:
        inputs = [inp for _, inp in clf.batches(feats, bs, sort_by_length=bs > 1)]
        idxs = [idx for idx, _ in clf.batches(feats, bs, sort_by_length=bs > 1)]
        np_inputs = [{k: np.ascontiguousarray(v.numpy()) for k, v in inp.items()} for inp in inputs]
        variants, agree, logps, known = {}, {}, {}, None
        for rt in args.runtime:
            c = clfs[rt]
            batches = inputs if rt == "torch" else np_inputs
            # correctness first (also the warm-up of the early-exit path)
            exits, preds = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
            logps[rt] = np.zeros((n, len(clf.label_names)), dtype=np.float32)
            with torch.inference_mode():
                for idx, inp in zip(idxs, batches):
                    logp, ex, _ = c.classify_batch(**inp)
                    exits[idx], preds[idx], logps[rt][idx] = ex, logp.argmax(-1), logp
            agree[rt] = {"preds": int((preds == ev_preds).sum()), "exit_layers": int((exits == ev_exits).sum()), "n": n}
            never = type(c)(model, c.tokenizer, NeverExit(), **({"graphs": c.graphs} if rt == "onnx" else {}))
            if rt == "torch":
                variants.update({
                    "torch:full": lambda inp: full_depth_logits(model, **inp),
                    "torch:full-hf": lambda inp: full_depth_logits(model, **inp, plain_forward=True),
                })
            else:
                variants["onnx:full"] = lambda inp, g=c.graphs: g.full_depth(**inp)
            variants[f"{rt}:ee-never"] = lambda inp, f=never.classify_batch: f(**inp)
            variants[f"{rt}:ee"] = lambda inp, f=c.classify_batch: f(**inp)
            if rt == "onnx" and bs == 1 and L > 1:  # the same chain told each exit layer: deciding for free
                from agents.inference.onnx_decision import KnownExitChain

                known = KnownExitChain(c.graphs)
                known_diff = 0.0  # (also its warm-up) the known-exit chain gives early exit's log-probabilities
                for idx, inp in zip(idxs, batches):
                    logp, _ = known.run(int(ev_exits[idx[0]]), **inp)
                    known_diff = max(known_diff, float(np.abs(logp - logps[rt][idx]).max()))
        # (torch inputs, numpy inputs, the evaluator's exit layer of the batch's first row)
        pairs = [(inputs[i], np_inputs[i], int(ev_exits[idxs[i][0]])) for i in range(len(inputs))]
        timed = {k: (lambda pair, f=f, rt=k.split(":")[0]: f(pair[0] if rt == "torch" else pair[1]))
                 for k, f in variants.items()}
        if known is not None:
            timed["onnx:ee-known"] = lambda pair, f=known.run: f(pair[2], **pair[1])
        with torch.inference_mode():
            times, cpu_times, per_batch = time_interleaved(timed, pairs, args.repeats, args.interleave)
        med = {k: statistics.median(v) for k, v in times.items()}
        cmed = {k: statistics.median(v) for k, v in cpu_times.items()}
        mins = {k: sum_of_minima(v) for k, v in per_batch.items()}
        row = {"seconds": med, "all_seconds": times, "cpu_seconds": cmed, "sum_of_batch_minima_seconds": mins,
               "ms_per_instance": {k: 1000 * v / n for k, v in med.items()}, "batches": len(inputs),
               "agree_with_evaluator": agree, "target_ratio": TARGETS.get(bs), "runtime": {}}
        if known is not None:
            row["onnx_known_exits_max_abs_log_prob_diff_vs_ee"] = known_diff
        if len(logps) == 2:
            row["onnx_vs_torch_max_abs_log_prob_diff"] = float(np.abs(logps["onnx"] - logps["torch"]).max())
        for rt in args.runtime:
            full = med[f"{rt}:full"]
            speed = full / med[f"{rt}:ee"]
            row["runtime"][rt] = {
                "speedup": speed, "ratio_to_predicted": speed / pred,
                "cpu_ratio_to_predicted": (cmed[f"{rt}:full"] / cmed[f"{rt}:ee"]) / pred,
                "ratio_to_token_weighted_prediction": speed / tok_pred,
                "ee_loop_overhead_at_full_depth": med[f"{rt}:ee-never"] / full - 1,
                "speedup_vs_torch_full": med["torch:full"] / med[f"{rt}:ee"] if "torch:full" in med else None,
                "ratio_to_predicted_sum_of_minima": mins[f"{rt}:full"] / mins[f"{rt}:ee"] / pred,
            }
            if f"{rt}:ee-known" in med:  # the decisions' cost, and the ratio with decisions free
                row["runtime"][rt]["known_exits_ratio_to_predicted"] = full / med[f"{rt}:ee-known"] / pred
                row["runtime"][rt]["known_exits_ratio_sum_of_minima"] = (mins[f"{rt}:full"] / mins[f"{rt}:ee-known"]
                                                                        / pred)
                row["runtime"][rt]["decision_cost"] = med[f"{rt}:ee"] / med[f"{rt}:ee-known"] - 1
        pres["batch"][str(bs)] = row
        tgt = TARGETS.get(bs)
        for rt, r in row["runtime"].items():
            verdict = "" if tgt is None else ("  PASS" if r["ratio_to_predicted"] >= tgt else f"  BELOW target {tgt}")
            a = agree[rt]
            print(f"  batch {bs:>3} {rt:<5}: full {med[f'{rt}:full']:.3f}s  ee {med[f'{rt}:ee']:.3f}s  "
                  f"ee-never {med[f'{rt}:ee-never']:.3f}s | speed-up {r['speedup']:.2f}x, predicted {pred:.2f}x, "
                  f"ratio {r['ratio_to_predicted']:.3f}{verdict} (CPU-time ratio {r['cpu_ratio_to_predicted']:.3f}, "
                  f"sum of batch minima {r['ratio_to_predicted_sum_of_minima']:.3f})"
                  f" | agree preds {a['preds']}/{n} exits {a['exit_layers']}/{n}")
            if "known_exits_ratio_to_predicted" in r:
                print(f"            exits known (no decision): ee {med[f'{rt}:ee-known']:.3f}s, ratio "
                      f"{r['known_exits_ratio_to_predicted']:.3f} (minima {r['known_exits_ratio_sum_of_minima']:.3f});"
                      f" the decisions cost {100 * r['decision_cost']:.1f}%")
        if "torch:full" in med and "onnx:full" in med:
            print(f"  batch {bs:>3}: onnx full depth is {med['torch:full'] / med['onnx:full']:.2f}x faster than "
                  f"torch full depth; onnx early exit {med['torch:full'] / med['onnx:ee']:.2f}x")
    return pres


def format_table(results: list[dict]) -> str:
    head = (f"{'task':<13} {'policy':<24} {'bs':>3} {'runtime':<7} {'avg exit':>8} {'full s':>8} {'ee s':>8} "
            f"{'speed-up':>8} {'predicted':>9} {'ratio':>6} {'ratio(cpu)':>10} {'ratio(tok)':>10} {'ee-ovh':>7} "
            f"{'agree':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        for name, p in r["policies"].items():
            for bs, b in p["batch"].items():
                s = b["seconds"]
                for rt, x in b["runtime"].items():
                    a = b["agree_with_evaluator"][rt]
                    ok = "yes" if a["preds"] == a["n"] and a["exit_layers"] == a["n"] else f"{a['exit_layers']}/{a['n']}"
                    lines.append(
                        f"{r['task']:<13} {name[:24]:<24} {bs:>3} {rt:<7} {p['avg_exit_layer']:>5.2f}/{p['num_layers']} "
                        f"{s[rt + ':full']:>8.3f} {s[rt + ':ee']:>8.3f} {x['speedup']:>7.2f}x "
                        f"{p['predicted_speedup']:>8.2f}x {x['ratio_to_predicted']:>6.3f} {x['cpu_ratio_to_predicted']:>10.3f} "
                        f"{x['ratio_to_token_weighted_prediction']:>10.3f} "
                        f"{100 * x['ee_loop_overhead_at_full_depth']:>6.1f}% {ok:>5}")
    return "\n".join(lines)


def format_markdown(res: dict) -> str:
    """The docs/inference_speed.md table of a saved results JSON: per task, rule and batch size, ONNX Runtime's
    early exit against its whole-model graph (and PyTorch's ratio when it was timed)."""
    torch_cols = any("torch" in b["runtime"] for t in res["results"] for p in t["policies"].values()
                     for b in p["batch"].values())
    head = ["task", "rule (chosen on calib)", "decision", "avg exit / L", "predicted", "batch", "onnx: full depth (s)",
            "onnx: early exit (s)", "speed-up", "ratio", "ratio, sum of minima", "exits known: ratio (minima)",
            "ratio, token-weighted"]
    head += ["torch: speed-up, ratio", "onnx ee vs torch full"] if torch_cols else []
    lines = ["| " + " | ".join(head + ["agree with evaluator"]) + " |", "|" + "---|" * (len(head) + 1)]
    for t in res["results"]:
        for k, p in t["policies"].items():
            kind, _, name = k.partition(":")
            for bs, b in p["batch"].items():
                o, s = b["runtime"]["onnx"], b["seconds"]
                a = b["agree_with_evaluator"]["onnx"]
                ok = "yes" if a["preds"] == a["n"] and a["exit_layers"] == a["n"] else \
                    f"exits {a['exit_layers']}/{a['n']}, preds {a['preds']}/{a['n']}"
                tgt = TARGETS.get(int(bs))
                def bold(r):
                    return "-" if r is None else f"**{r:.3f}**" if tgt is not None and r >= tgt else f"{r:.3f}"

                ratio = bold(o["ratio_to_predicted"])
                known = "-" if "known_exits_ratio_to_predicted" not in o else \
                    f"{o['known_exits_ratio_to_predicted']:.3f} ({o['known_exits_ratio_sum_of_minima']:.3f})"
                row = [t["task"], f"{kind}: {name}" if name else k, p.get("onnx_decisions", "numpy"),
                       f"{p['avg_exit_layer']:.2f} / {p['num_layers']}", f"{p['predicted_speedup']:.2f}x", bs,
                       f"{s['onnx:full']:.3f}", f"{s['onnx:ee']:.3f}", f"{o['speedup']:.2f}x", ratio,
                       bold(o.get("ratio_to_predicted_sum_of_minima")), known,
                       f"{o['ratio_to_token_weighted_prediction']:.2f}"]
                if torch_cols:
                    tr = b["runtime"].get("torch")
                    row += [f"{tr['speedup']:.2f}x, {tr['ratio_to_predicted']:.2f}" if tr else "-",
                            f"{o['speedup_vs_torch_full']:.2f}x" if o.get("speedup_vs_torch_full") else "-"]
                lines.append("| " + " | ".join(map(str, row + [ok])) + " |")
    lines += ["", f"threads {res['threads']}, repeats {res['repeats']}, interleaved by {res.get('interleave', 'batch')}, "
                  f"decisions {res.get('decisions', 'numpy')}, load average at start {res['load_average_at_start']:.2f}, "
                  f"{res['time']}"]
    return "\n".join(lines)


@dataclass
class Args:
    """Settings of ``python -m benchmarks.inference_speed``; every field is a flag."""

    tasks: tuple[str, ...] = ("RTE", "MRPC")
    """tasks whose dev sets to time"""
    policy_run: Repeatable = ()
    """a trained policy run dir (agents.reinforce or agents.sb3), or TASK=DIR for one task"""
    rules: tuple[str, ...] | None = None
    """exit rules to time (see agents.predict; maxprob:auto calibrates a max-prob threshold on the calib cache);
    None: static-3 maxprob:auto when no --policy-run is given, else none"""
    from_benchmark: str | None = None
    """an agents.benchmark results.json: time each task's headline rules, the best learned policy (its deployed
    run, threshold chosen on calib) and the best heuristic (knob chosen on calib), on the benchmark's checkpoint"""
    target_saved: float = 0.5
    """fraction of layers maxprob:auto aims to save"""
    checkpoint: str | None = None
    """backbone checkpoint; None: the task's deployed stage-1 checkpoint (cee_env.cache.deployed_checkpoint)"""
    dev_file: str | None = None
    """dev file path instead of the task's (single task)"""
    train_missing: bool = False
    """train a missing deployed stage-1 checkpoint (else a task without one is an error)"""
    runtime: tuple[str, ...] = ("torch", "onnx")
    """runtimes to time: torch (PyTorch eager, the layer loop) and/or onnx (ONNX Runtime: the whole model in
    one graph for full depth, one graph per layer for early exit)"""
    batch_sizes: tuple[int, ...] = (1, 32)
    """batch sizes"""
    repeats: int = 5
    """timed passes per variant after a warm-up (median)"""
    interleave: str = "pass"
    """pass: each variant times whole passes over the dev set, the variants taking turns pass by pass (a
    deployment serving one model); batch: the variants take turns batch by batch (each one's weights evicted
    from the caches by the others' in between)"""
    decisions: str = "graph"
    """where ONNX Runtime's early exit makes the exit decision: graph (inside each layer's graph for policies
    whose decision exports, and at batch 1 the whole early exit as one graph), numpy (after each layer, in
    Python)"""
    limit: int | None = None
    """time only the first N dev instances; None: all"""
    threads: int | None = None
    """torch threads and ONNX Runtime intra-op threads; None: all cores"""
    out: str | None = None
    """JSON path; None: runs/benchmarks/inference_speed.json"""
    table: str | None = None
    """time nothing: print the markdown table (docs/inference_speed.md's) of this saved results JSON"""


@user_errors
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(Args, argv, __doc__)
    if args.table:
        from backbones.files import read_json

        try:
            res = read_json(args.table, "pass a results JSON written by python -m benchmarks.inference_speed")
        except FileNotFoundError:
            raise UserError(f"--table {args.table}: no such file") from None
        if not isinstance(res, dict) or not isinstance(res.get("results"), list):
            raise UserError(f"--table {args.table} is not a results JSON of python -m benchmarks.inference_speed")
        print(format_markdown(res))
        return res["results"]
    if (args.checkpoint or args.dev_file) and len(args.tasks) != 1:
        raise UserError("--checkpoint / --dev-file need exactly one task in --tasks")
    bad = [r for r in args.runtime if r not in RUNTIMES]
    if bad or not args.runtime:
        raise UserError(f"--runtime takes one or more of {', '.join(RUNTIMES)}; got {' '.join(args.runtime) or 'none'}")
    args.runtime = tuple(dict.fromkeys(args.runtime))
    from agents.inference.onnx_runtime import DECISIONS

    if args.interleave not in INTERLEAVE:
        raise UserError(f"--interleave takes one of {', '.join(INTERLEAVE)}; got {args.interleave}")
    if args.decisions not in DECISIONS:
        raise UserError(f"--decisions takes one of {', '.join(DECISIONS)}; got {args.decisions}")
    args.threads = args.threads or os.cpu_count() or 1

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, load average {load}")
    if load is not None and load > 0.5 * (os.cpu_count() or 1):
        print("warning: the machine is busy (load average above half the cores); timings will be noisy")
    from backbones.paths import runs_dir

    out = Path(args.out) if args.out else runs_dir() / "benchmarks" / "inference_speed.json"
    meta = {"targets_ratio_by_batch": TARGETS, "threads": args.threads, "repeats": args.repeats,
            "interleave": args.interleave, "decisions": args.decisions,
            "load_average_at_start": load, "machine": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    results: list[dict] = []

    def write(partial: dict | None = None) -> None:  # after every policy, so an interrupted run keeps its numbers
        done = results + ([partial] if partial is not None and partial not in results else [])
        write_json(out, {"results": done, **meta, "complete": partial is None})

    for t in args.tasks:
        results.append(bench_task(t, args, on_progress=write))
    print("\n" + format_table(results))
    write()
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
