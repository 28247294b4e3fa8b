"""Markdown for docs/risk_control.md: per risk setting and task, the learned policy and the other method
(heuristics, BERxiT) that save the most layers under the Learn-then-Test guarantee, and the largest
violation frequency of any method, from an agents.benchmark results.json.

    python -m benchmarks.risk_summary runs/benchmark/results.json
"""
from __future__ import annotations

import json
import sys

from agents.benchmark import method_label, parse_setting

OTHERS = ("static", "deebert", "maxprob", "pabee", "berxit")


def _best(rows: dict, methods: list[str], key) -> tuple[str, float]:
    return max(((m, key(rows[m])) for m in methods), key=lambda mv: mv[1])


def short(method: str) -> str:
    """A compact method name for the summary: 'PPO confidence/consistency', 'Right-Tool (max prob)'."""
    if method in OTHERS:
        return method_label(method)
    algo, obs, reward = method.split(":")
    return f"{'REINFORCE' if algo == 'reinforce' else algo.upper()} {obs}/{reward}"


def summary(res: dict) -> str:
    out = []
    for setting in res["config"]["ltt"]:
        risk, eps, delta = parse_setting(setting)
        header = ("| task | max violation frequency | best learned, re-draws | best other, re-draws | "
                  "best learned, test | best other, test |")
        out += [f"**{risk} <= {eps:g}, delta = {delta:g}** (saved layers)", "", header, "|---" * 6 + "|"]
        for t in res["config"]["tasks"]:
            rows = res["risk_control"][t][setting]
            learned = [m for m in rows if m not in OTHERS]
            others = [m for m in rows if m in OTHERS]
            worst = max(r["validation"]["violation_frequency"] for r in rows.values())
            cells = []
            for key in (lambda r: r["validation"]["mean_population_saved"], lambda r: r["dev"]["saved"]):
                for group in (learned, others):
                    m, v = _best(rows, group, key)
                    cells.append(f"{short(m)} {100 * v:.1f}%")
            out.append(f"| {t} | {100 * worst:.1f}% | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m benchmarks.risk_summary RESULTS.json")
    try:
        with open(argv[0], encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"{argv[0]}: not a readable agents.benchmark results.json ({e})")
    if not res.get("risk_control") or not res["config"].get("ltt_resplits"):
        sys.exit(f"{argv[0]}: has no risk-control re-draws (run agents.benchmark with --ltt-resplits > 0)")
    print(summary(res))


if __name__ == "__main__":
    main()
