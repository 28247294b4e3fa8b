"""Early-exit inference speed: does skipping layers save the time it promises?

For each task's dev set and each batch size (default 1 and 32), wall time of

- ``full-loop``:  the full-depth model through the same layer-by-layer loop, last classifier only
- ``full-hf``:    the full-depth model through the encoder's own (Hugging Face) forward
- ``ee:<policy>``: :class:`agents.inference.early_exit_model.EarlyExitClassifier` with the policy
  (every layer's classifier, the policy, rows leaving the batch as they exit)
- ``ee:full``:     the generic early-exit loop with a policy that never exits (its overhead:
  every layer's classifier and a policy call; a static rule skips those)

Tokenisation and padding happen before timing, identically for all; with batch
size > 1 the dev set is sorted by length first (for all). Each figure is the median
of ``--repeats`` passes over the dev set after one warm-up pass; the variants are
interleaved batch by batch (in rotating order) so background load hits all alike.
Process CPU time is recorded too (robust to other processes on a busy machine;
with 1 thread it is the compute time). Speed-up = t(full-loop) / t(ee) in wall
time; the speed-up the saved layers predict is
L / average exit layer; the ratio of the two should be >= 0.9 at batch 1 and >= 0.8
at batch 32. Also reported: the token-weighted prediction L * sum(len) / sum(len * exit)
(compute grows with tokens, and long instances tend to exit later) and the ratio to it,
which isolates the implementation's overhead from that property of the data. Also checked: the early-exit predictions and exit layers equal what the
evaluator (agents.evaluate over the layer cache) reports for the same policy.

Policies: ``--policy-run DIR`` (a trained policy run of agents.reinforce or agents.sb3;
``TASK=DIR`` for one task) and the rules of ``--rules``; without a policy run the rules
default to ``static-3`` and ``maxprob:auto`` (a max-probability threshold chosen on the
dev cache so that about half of the layers are saved).

    python -m benchmarks.inference_speed [--tasks RTE MRPC] [--policy-run DIR] [--out PATH]
"""
from __future__ import annotations

import json
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

from agents.inference.early_exit_model import EarlyExitClassifier, full_depth_logits
from agents.evaluate import evaluate
from agents.policies import ExitPolicy
from agents.policies.heuristics import MaxProbExit
from agents.predict import parse_rule
from backbones.cli import Repeatable, UserError, parse, user_errors
from backbones.files import write_json

TARGETS = {1: 0.9, 32: 0.8}  # ratio measured / predicted speed-up, by batch size
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


def load_policies(task: str, args, default_ckpt, cache_for) -> list[tuple[str, object, str, Path]]:
    """(key, policy, description, checkpoint) for this task."""
    out = []
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
            p = calibrate_maxprob(cache_for(ckpt), args.target_saved)
            desc = (f"max-prob rule, threshold {p.threshold:g} chosen on the dev cache to save "
                    f"~{100 * args.target_saved:.0f}% of layers{note}")
        else:
            p = parse_rule(rule)
            desc = f"rule {rule}{note}"
        out.append((p.name, p, desc, ckpt))
    return out


def time_interleaved(variants: dict, batches: list, repeats: int) -> tuple[dict, dict]:
    """Wall and CPU seconds per pass over ``batches`` for each variant: lists of ``repeats`` values.

    Every batch is run by every variant back to back (in an order rotating with the
    batch), so slow changes in background load hit all variants alike. Pass 0 is a
    warm-up and not recorded.
    """
    names = list(variants)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for r in range(repeats + 1):
        w = dict.fromkeys(names, 0.0)
        c = dict.fromkeys(names, 0.0)
        for i, inputs in enumerate(batches):
            j = (i + r) % len(names)
            for k in names[j:] + names[:j]:
                c0, t0 = time.process_time(), time.perf_counter()
                variants[k](inputs)
                w[k] += time.perf_counter() - t0
                c[k] += time.process_time() - c0
        if r > 0:
            for k in names:
                wall[k].append(w[k])
                cpu[k].append(c[k])
    return wall, cpu


def bench_task(task: str, args, on_progress=None) -> dict | None:
    from backbones import tasks as T
    from backbones.train import TrainConfig, checkpoint_dir, ensure_checkpoint, is_complete
    from cee_env.cache import get_cache

    spec = T.get_task(task)
    caches: dict[str, object] = {}

    def default_ckpt() -> Path:
        if args.checkpoint:
            return Path(args.checkpoint)
        ck = checkpoint_dir(TrainConfig(task=spec.name).resolved())
        if is_complete(ck):
            return ck
        if not args.train_missing:
            raise FileNotFoundError(f"no trained stage-1 checkpoint at {ck}; train it with "
                                    f"`python -m backbones.train --task {spec.name}` or pass --train-missing")
        return ensure_checkpoint(spec.name)

    def cache_for(ckpt: Path):
        if str(ckpt) not in caches:
            caches[str(ckpt)] = get_cache(spec.name, "dev", checkpoint=ckpt, data_file=args.dev_file, verbose=False)
        return caches[str(ckpt)]

    try:
        policies = load_policies(spec.name, args, default_ckpt, cache_for)
    except FileNotFoundError as e:
        print(f"skipping {spec.name}: {e}")
        return None
    ds = T.load_split(spec, "dev", path=args.dev_file)
    if args.limit:
        ds = ds.select(range(min(args.limit, len(ds))))
    result = {"task": spec.name, "n": len(ds), "policies": {}}
    for key, policy, desc, ckpt in policies:
        cache = cache_for(ckpt)
        clf = EarlyExitClassifier.from_checkpoint(ckpt, policy)
        model, L = clf.model, clf.num_layers
        full_clf = EarlyExitClassifier(model, clf.tokenizer, NeverExit())
        ev = evaluate(policy, cache)
        n = len(ds)
        ev_exits, ev_preds = ev.exit_layers[:n], ev.preds[:n]
        avg_exit = float(ev_exits.mean())
        feats = clf.tokenize(ds["text_a"], ds["text_b"])
        lens = np.array([len(f["input_ids"]) for f in feats], dtype=np.float64)
        # compute ~ tokens x layers (attention's T^2 term is small at these lengths): long instances that
        # exit late save less than their layer count says
        tok_pred = L * lens.sum() / (lens * ev_exits).sum()
        pres = {"description": desc, "checkpoint": str(ckpt), "num_layers": L, "avg_exit_layer": avg_exit,
                "predicted_speedup": L / avg_exit, "predicted_speedup_token_weighted": tok_pred,
                f"dev_{ev.metric_name}": ev.metric, "batch": {}}
        print(f"\n{spec.name} [{key}]: {desc}\n  checkpoint {ckpt}; dev {ev.metric_name} {100 * ev.metric:.1f} at avg exit "
              f"{avg_exit:.2f}/{L} -> predicted speed-up {L / avg_exit:.2f}x ({tok_pred:.2f}x token-weighted)")
        for bs in args.batch_sizes:
            batch_list = [(idx, inp) for idx, inp in clf.batches(feats, bs, sort_by_length=bs > 1)]
            inputs = [inp for _, inp in batch_list]
            # correctness first (also the warm-up of the early-exit path)
            exits = np.zeros(n, dtype=np.int64)
            preds = np.zeros(n, dtype=np.int64)
            calls = 0
            with torch.inference_mode():
                for idx, inp in batch_list:
                    logp, ex, k = clf.classify_batch(**inp)
                    exits[idx], preds[idx] = ex, logp.argmax(-1)
                    calls += k
            variants = {
                "full-loop": lambda inp: full_depth_logits(model, **inp),
                "full-hf": lambda inp: full_depth_logits(model, **inp, plain_forward=True),
                "ee:full": lambda inp: full_clf.classify_batch(**inp),
                "ee": lambda inp: clf.classify_batch(**inp),
            }
            with torch.inference_mode():
                times, cpu_times = time_interleaved(variants, inputs, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            cmed = {k: statistics.median(v) for k, v in cpu_times.items()}
            speed = med["full-loop"] / med["ee"]
            row = {
                "seconds": med, "all_seconds": times, "cpu_seconds": cmed,
                "ms_per_instance": {k: 1000 * v / n for k, v in med.items()},
                "speedup_vs_full_loop": speed, "speedup_vs_full_hf": med["full-hf"] / med["ee"],
                "ratio_to_predicted": speed / (L / avg_exit),
                "ratio_to_predicted_vs_full_hf": (med["full-hf"] / med["ee"]) / (L / avg_exit),
                "cpu_ratio_to_predicted": (cmed["full-loop"] / cmed["ee"]) / (L / avg_exit),
                "ratio_to_token_weighted_prediction": speed / tok_pred,
                "ee_loop_overhead_at_full_depth": med["ee:full"] / med["full-loop"] - 1,
                "layer_calls": calls, "batches": len(inputs),
                "agree_with_evaluator": {"preds": int((preds == ev_preds).sum()),
                                         "exit_layers": int((exits == ev_exits).sum()), "n": n},
                "target_ratio": TARGETS.get(bs),
            }
            pres["batch"][str(bs)] = row
            tgt = TARGETS.get(bs)
            verdict = "" if tgt is None else ("  PASS" if row["ratio_to_predicted"] >= tgt else f"  BELOW target {tgt}")
            print(f"  batch {bs:>3}: full-loop {med['full-loop']:.3f}s  full-hf {med['full-hf']:.3f}s  "
                  f"ee {med['ee']:.3f}s  ee:full {med['ee:full']:.3f}s | speed-up {speed:.2f}x "
                  f"(vs hf {row['speedup_vs_full_hf']:.2f}x), predicted {L / avg_exit:.2f}x, "
                  f"ratio {row['ratio_to_predicted']:.3f}{verdict} (CPU-time ratio {row['cpu_ratio_to_predicted']:.3f}) | agree preds {row['agree_with_evaluator']['preds']}/{n} "
                  f"exits {row['agree_with_evaluator']['exit_layers']}/{n}")
        result["policies"][key] = pres
        if on_progress is not None:
            on_progress(result)
    return result


def format_table(results: list[dict]) -> str:
    head = (f"{'task':<6} {'policy':<24} {'bs':>3} {'avg exit':>8} {'full-loop s':>11} {'full-hf s':>9} "
            f"{'ee s':>7} {'speed-up':>8} {'predicted':>9} {'ratio':>6} {'ratio(hf)':>9} {'ratio(cpu)':>10} "
            f"{'pred(tok)':>9} {'ratio(tok)':>10} {'ee-ovh':>7} {'agree':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        for name, p in r["policies"].items():
            for bs, b in p["batch"].items():
                s, a = b["seconds"], b["agree_with_evaluator"]
                ok = "yes" if a["preds"] == a["n"] and a["exit_layers"] == a["n"] else f"{a['exit_layers']}/{a['n']}"
                lines.append(
                    f"{r['task']:<6} {name[:24]:<24} {bs:>3} {p['avg_exit_layer']:>5.2f}/{p['num_layers']} "
                    f"{s['full-loop']:>11.3f} {s['full-hf']:>9.3f} {s['ee']:>7.3f} {b['speedup_vs_full_loop']:>7.2f}x "
                    f"{p['predicted_speedup']:>8.2f}x {b['ratio_to_predicted']:>6.3f} "
                    f"{b['ratio_to_predicted_vs_full_hf']:>9.3f} {b['cpu_ratio_to_predicted']:>10.3f} "
                    f"{p['predicted_speedup_token_weighted']:>8.2f}x {b['ratio_to_token_weighted_prediction']:>10.3f} "
                    f"{100 * b['ee_loop_overhead_at_full_depth']:>6.1f}% {ok:>5}")
    return "\n".join(lines)


@dataclass
class Args:
    """Settings of ``python -m benchmarks.inference_speed``; every field is a flag."""

    tasks: tuple[str, ...] = ("RTE", "MRPC")
    """tasks whose dev sets to time"""
    policy_run: Repeatable = ()
    """a trained policy run dir (agents.reinforce or agents.sb3), or TASK=DIR for one task"""
    rules: tuple[str, ...] | None = None
    """exit rules to time (see agents.predict; maxprob:auto calibrates a max-prob threshold on the dev cache);
    None: static-3 maxprob:auto when no --policy-run is given, else none"""
    target_saved: float = 0.5
    """fraction of layers maxprob:auto aims to save"""
    checkpoint: str | None = None
    """backbone checkpoint; None: the task's default stage-1 one"""
    dev_file: str | None = None
    """dev file path instead of the task's (single task)"""
    train_missing: bool = False
    """train a missing default stage-1 checkpoint (else the task is skipped)"""
    batch_sizes: tuple[int, ...] = (1, 32)
    """batch sizes"""
    repeats: int = 5
    """timed passes per variant after a warm-up (median)"""
    limit: int | None = None
    """time only the first N dev instances; None: all"""
    threads: int | None = None
    """torch threads; None: all cores"""
    out: str | None = None
    """JSON path; None: runs/benchmarks/inference_speed.json"""


@user_errors
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(Args, argv, __doc__)
    if (args.checkpoint or args.dev_file) and len(args.tasks) != 1:
        raise UserError("--checkpoint / --dev-file need exactly one task in --tasks")
    args.threads = args.threads or os.cpu_count() or 1

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, load average {load}")
    if load is not None and load > 0.5 * (os.cpu_count() or 1):
        print("warning: the machine is busy (load average above half the cores); timings will be noisy")
    from backbones.paths import runs_dir

    out = Path(args.out) if args.out else runs_dir() / "benchmarks" / "inference_speed.json"
    meta = {"targets_ratio_by_batch": TARGETS, "threads": args.threads, "repeats": args.repeats,
            "load_average_at_start": load, "machine": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    results: list[dict] = []

    def write(partial: dict | None = None) -> None:  # after every policy, so an interrupted run keeps its numbers
        done = results + ([partial] if partial is not None and partial not in results else [])
        write_json(out, {"results": done, **meta, "complete": partial is None})

    for t in args.tasks:
        r = bench_task(t, args, on_progress=write)
        if r is not None:
            results.append(r)
    if results:
        print("\n" + format_table(results))
    write()
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
