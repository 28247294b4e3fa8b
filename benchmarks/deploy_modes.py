"""Which deployed rule for the learned methods (``agents.benchmark --deploy``), measured on calib only.

    python -m benchmarks.deploy_modes                                  # the synthetic task
    python -m benchmarks.deploy_modes --tasks MCID --out runs/deploy_modes_mcid.json

Calib is split into its two fixed stratified halves (calib-a / calib-b). Each mode runs the benchmark's
learned sweep on one half as if it were all of calib (cross-fitted there, its '<= 1 pt' knob chosen there) and
its deployed rule is scored on the other half, which plays the test set; then the halves swap. Per mode, over
every learned method and both directions: the other half's saved layers and score change vs full depth, and
how far the figure the knob was chosen on is from what the deployed rule does on the other half (the rule
chosen vs the rule deployed). No test split is read. Writes the figures as JSON (--out).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from agents.benchmark import DEPLOY_MODES, BenchmarkConfig, load_caches, run_benchmark
from cee_env.cache import calib_half


@dataclass
class Args:
    tasks: tuple[str, ...] = ("Synthetic",)
    """tasks whose calib is split (their deployed backbone and calib cache are built if missing)"""
    learners: tuple[str, ...] = ("reinforce:confidence:consistency", "fqi:confidence:consistency")
    """learned policies as in agents.benchmark --learners"""
    alphas: tuple[float, ...] = (0.01, 0.05, 0.2)
    """depth penalties per learner"""
    modes: tuple[str, ...] = DEPLOY_MODES
    """deploy modes to compare"""
    epochs: int = 10
    """REINFORCE epochs per policy"""
    seed: int = 0
    """seed of folds and policies"""
    out: str = "runs/deploy_modes.json"
    """where the figures go"""


def measure(args: Args) -> dict:
    from backbones.files import write_json
    from backbones.paths import runs_dir

    rows: dict[str, list[dict]] = {m: [] for m in args.modes}
    t0 = time.time()
    for task in args.tasks:
        base = BenchmarkConfig(tasks=(task,), learners=args.learners, alphas=args.alphas, epochs=args.epochs,
                               seed=args.seed, ltt=(), ltt_resplits=0, plots=False, quiet=True)
        calib = load_caches(task, base, None, None)["calib"]
        for fit_half, other in (("calib-a", "calib-b"), ("calib-b", "calib-a")):
            caches = {"calib": calib_half(calib, fit_half), "dev": calib_half(calib, other)}
            for mode in args.modes:
                cfg = replace(base, deploy=mode, out=str(runs_dir() / "deploy_modes" / f"{task}-{fit_half}-{mode}"))
                ops = run_benchmark({task: caches}, cfg)["operating_points"][task]
                for m in (m for s in args.learners for m in (s, s + "+paper")):
                    op = (ops.get(m) or {}).get("max1")
                    if op is None:
                        continue
                    full = ops["full"]
                    rows[mode].append({"task": task, "method": m, "chosen_on": fit_half,
                                       "chosen_saved": op["calib"]["saved"], "chosen_change": op["calib"]["metric"] - full["calib"]["metric"],
                                       "other_saved": op["dev"]["saved"], "other_change": op["dev"]["metric"] - full["dev"]["metric"]})
    summary = {}
    for mode, rs in rows.items():
        a = {k: np.array([r[k] for r in rs]) for k in ("chosen_saved", "chosen_change", "other_saved", "other_change")}
        summary[mode] = {"n": len(rs), "other_saved": float(a["other_saved"].mean()),
                         "other_change": float(a["other_change"].mean()),
                         "within_1pt_on_other": float((a["other_change"] >= -0.01 - 1e-9).mean()),
                         "saved_error": float(np.abs(a["chosen_saved"] - a["other_saved"]).mean()),
                         "change_error": float(np.abs(a["chosen_change"] - a["other_change"]).mean())}
    result = {"args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
              "summary": summary, "rows": rows, "wall_time_s": round(time.time() - t0, 1)}
    write_json(args.out, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    from backbones.cli import parse, user_errors

    res = user_errors(measure)(parse(Args, argv, __doc__))
    print("| deploy | rows | other half: saved | score change | within 1 pt | |chosen - other| saved | score change |")
    print("|---|---|---|---|---|---|---|")
    for mode, s in res["summary"].items():
        print(f"| {mode} | {s['n']} | {100 * s['other_saved']:.1f}% | {100 * s['other_change']:+.2f} | "
              f"{100 * s['within_1pt_on_other']:.0f}% | {100 * s['saved_error']:.1f} | {100 * s['change_error']:.2f} |")
    print(f"({res['wall_time_s']:.0f} s) written: {res['args']['out']}")
    return res


if __name__ == "__main__":
    main()
