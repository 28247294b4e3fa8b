"""Markdown for docs/risk_control.md: per risk setting and task, the learned policy and the other method
(heuristics, BERxiT) that save the most layers on calib under the Learn-then-Test guarantee (picked on calib,
never on the re-draws or test, which read the test split), what each saves on calib, over the re-draws and on
test, and the largest violation frequency of any method, from an agents.benchmark results.json.

    python -m benchmarks.risk_summary runs/benchmark/results.json
"""
from __future__ import annotations

import json
import sys

from agents.benchmark import method_label, parse_setting

OTHERS = ("static", "deebert", "maxprob", "pabee", "berxit")


def calib_saved(row: dict) -> float:
    """Saved layers on the calibration rows at the Learn-then-Test choice (0 when no value passed: full depth)."""
    return row["calibration"]["saved"] if row["calibration"]["threshold"] is not None else 0.0


def pick_on_calib(rows: dict, methods: list[str]) -> str:
    """The method saving the most layers on its calibration rows (the first listed on ties)."""
    return max(methods, key=lambda m: calib_saved(rows[m]))


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
        header = ("| task | max violation frequency | best learned on calib | calib, re-draws, test saved | "
                  "best other on calib | calib, re-draws, test saved |")
        out += [f"**{risk} <= {eps:g}, delta = {delta:g}** (saved layers; methods picked on calib)", "", header,
                "|---" * 6 + "|"]
        ahead = []
        for t in res["config"]["tasks"]:
            rows = res["risk_control"][t][setting]
            worst = max(r["validation"]["violation_frequency"] for r in rows.values())
            cells, test = [], []
            for group in ([m for m in rows if m not in OTHERS], [m for m in rows if m in OTHERS]):
                m = pick_on_calib(rows, group)
                r = rows[m]
                cells += [short(m), f"{100 * calib_saved(r):.1f}%, {100 * r['validation']['mean_population_saved']:.1f}%, "
                                    f"{100 * r['dev']['saved']:.1f}%"]
                test.append(r["dev"]["saved"])
            if test[0] > test[1]:
                ahead.append(t)
            out.append(f"| {t} | {100 * worst:.1f}% | " + " | ".join(cells) + " |")
        out += ["", f"The learned policy picked on calib saves more test layers than the other method picked on calib "
                    f"on {len(ahead)} of {len(res['config']['tasks'])} tasks" + (f" ({', '.join(ahead)})." if ahead else "."), ""]
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
