"""Markdown for docs/depth.md: per task, the stage-1 per-layer curve of each backbone and the benchmark headline
(best heuristic and best learned method on calib, read on test) side by side for two or more backbones.

    python -m benchmarks.depth_table --benchmarks runs/benchmark runs/benchmark-all-mpnet-base-v2

Each --benchmarks folder is an agents.benchmark output (results.json); the stage-1 curves come from the
checkpoints those runs used (metrics.json beside the weights).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from backbones.cli import UserError, parse, user_errors
from backbones.files import resolve_stored


@dataclass
class Args:
    benchmarks: tuple[str, ...] = ("runs/benchmark", "runs/benchmark-all-mpnet-base-v2")
    """agents.benchmark output folders (one per backbone)"""
    split: str = "dev"
    """the test split to read: dev (GLUE / task dev) or test (a --test-file)"""


def _load(folder: str) -> dict:
    f = Path(folder) / "results.json"
    if not f.is_file():
        raise UserError(f"{f} not found: run agents.benchmark with --out {folder} first")
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise UserError(f"{f} is not valid JSON ({e}); run the benchmark again") from e


def _checkpoint(res: dict, task: str) -> Path | None:
    ck = (res.get("checkpoints") or {}).get(task)
    return resolve_stored(ck) if ck else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(p: dict | None, full: dict) -> str:
    if not p:
        return "-"
    return f"{100 * p['saved']:.1f}% ({100 * (p['metric'] - full['metric']):+.1f})"


def _hist(p: dict | None) -> str:
    return "-" if not p or not p.get("exit_hist") else " ".join(str(int(h)) for h in p["exit_hist"])


def rows(results: dict[str, dict], split: str) -> tuple[list[str], list[str]]:
    """(the side-by-side headline rows, the per-layer curve rows)."""
    head, curves = [], []
    tasks = list(dict.fromkeys(t for r in results.values() for t in r["operating_points"]))
    for t in tasks:
        for name, r in results.items():
            ops = r["operating_points"].get(t)
            if not ops or split not in ops["splits"]:
                continue
            full = ops["full"][split]
            h = r["headline"][t]
            learned, heur = h.get("learned") or {}, h.get("heuristic") or {}
            lp, hp = learned.get(split), heur.get(split)
            gap = "-" if not (lp and hp) else f"{100 * (lp['saved'] - hp['saved']):+.1f}"
            layers = full.get("num_layers", "?")
            head.append(f"| {t} | {name} | {layers} | {_pct(full['metric'])} | {heur.get('method', '-')} | "
                        f"{_cell(hp, full)} | {learned.get('method', '-')} | {_cell(lp, full)} | {gap} | {_hist(lp)} |")
            ck = _checkpoint(r, t)
            m = ck / "metrics.json" if ck else None
            if m and m.is_file():
                lm = json.loads(m.read_text()).get("dev", {}).get("layer_metric", [])
                curves.append(f"| {t} | {name} | " + " ".join(f"{100 * v:.1f}" for v in lm) + " |")
    return head, curves


@user_errors
def main(argv: list[str] | None = None) -> None:
    a = parse(Args, argv, __doc__)
    results = {}
    for b in a.benchmarks:
        r = _load(b)
        results[Path(b).name] = r
    head, curves = rows(results, a.split)
    print(f"| task | run | layers | full depth ({a.split}) | best heuristic (calib) | saved ({a.split} change) | "
          f"best learned (calib) | saved ({a.split} change) | gap | learned exits per layer ({a.split}) |")
    print("|---" * 10 + "|")
    print("\n".join(head))
    if curves:
        print(f"\n| task | run | {a.split} score by exit layer 1..L (stage 1) |\n|---|---|---|")
        print("\n".join(curves))


if __name__ == "__main__":
    main()
