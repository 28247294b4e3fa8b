"""Markdown for docs/protocol.md: two agents.benchmark results (holdout, crossfit) side by side on the
tasks both ran; test = each task's dev split, every knob chosen on calib by the benchmark itself.

    python -m benchmarks.protocol_table runs/benchmark/results.json runs/benchmark_crossfit/results.json
"""
from __future__ import annotations

import json
import sys

from agents.benchmark import method_label, score_cell


def _point(res: dict, task: str, method: str, split: str) -> dict:
    return next(p for p in res["points"] if p["task"] == task and p["method"] == method and p["split"] == split)


def tables(runs: dict[str, dict]) -> str:
    first, *_ = runs.values()
    tasks = [t for t in first["config"]["tasks"] if all(t in r["config"]["tasks"] for r in runs.values())]
    header = ("| task | protocol | calib n | full depth (test) | best heuristic: test score (change) saved | "
              "best learned: test score (change) saved | gap |")
    lines = [header, "|---" * 7 + "|"]
    for t in tasks:
        for name, r in runs.items():
            full = _point(r, t, "full", "dev")
            n = _point(r, t, "full", "calib")["n"]
            learned, heur = r["headline"][t]["learned"], r["headline"][t]["heuristic"]
            gap = 100 * (learned["dev"]["saved"] - heur["dev"]["saved"])
            lines.append(f"| {t} | {name} | {n} | {100 * full['metric']:.1f} | {method_label(heur['method'])}: "
                         f"{score_cell(heur['dev'], full)} | {method_label(learned['method'])}: "
                         f"{score_cell(learned['dev'], full)} | {gap:+.1f} |")
    ops = first["operating_points"][tasks[0]]
    methods = [m for m, v in ops.items() if isinstance(v, dict) and "max1" in v
               and m not in ("full", "oracle") and not m.endswith("+paper")]
    lines += ["", "Per method, test saved layers at the calib-chosen '<= 1 pt' point (test score change), "
              + " / ".join(runs) + ":", "", "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in methods:
        cells = []
        for t in tasks:
            parts = []
            for r in runs.values():
                p = r["operating_points"][t][m]["max1"]
                full = _point(r, t, "full", "dev")["metric"]
                parts.append("-" if not p else f"{100 * p['dev']['saved']:.0f}% ({100 * (p['dev']['metric'] - full):+.1f})")
            cells.append(" / ".join(parts))
        lines.append(f"| {method_label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit("usage: python -m benchmarks.protocol_table HOLDOUT_RESULTS.json CROSSFIT_RESULTS.json")
    runs = {}
    for name, path in zip(("holdout", "crossfit"), argv):
        try:
            with open(path, encoding="utf-8") as f:
                runs[name] = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"{path}: not a readable agents.benchmark results.json ({e})")
    print(tables(runs))


if __name__ == "__main__":
    main()
