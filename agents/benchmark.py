"""The paper's accuracy-speed comparison (Table 3 layout, Figure 4 ablation) on one stage-1 backbone.

    python -m agents.benchmark --tasks RTE,MRPC
    python -m agents.benchmark --tasks RTE --alphas 0.01,0.05 --epochs 5 --test-file RTE=path/to/labelled_test.tsv

Every method is an ExitPolicy scored by the one evaluator on the same cached
backbone outputs, and every method's knob is swept:

  static exit at layer k (k = 1..L)       DeeBERT: entropy threshold
  Right-Tool: max-probability threshold   PABEE: patience 1..L-1
  BERxiT: LTE-head threshold (head fitted on the train cache)
  ConsistentEE, vanilla (Eq 3) and hardness-guided (Eq 4) rewards: alpha sweep,
    one REINFORCE policy per (reward, alpha, seed), inference threshold 0.5 (paper)
  [extension] the same policies with their exit threshold swept too
  the full-depth backbone and the oracle (first correct layer) as references

Two operating points per method are chosen on DEV: (a) the most saved layers with
no loss against the full-depth model's dev score, (b) the most saved layers with
at most 1 point lost. They are reported on dev (optimistic: chosen and measured on
the same data) and, for tasks given a labelled --test-file, on test (the test
score of the knob chosen on dev). With several seeds, a ConsistentEE point is the
mean over seeds of one alpha.

Writes under --out (default runs/benchmark/): table.md (Table 3 layout, dev and
test), results.json (every point: method, knob, seed, split, metric, saved, avg
exit), <task>_curves.png (metric vs saved layers, every method) and
fig4_reward_ablation.png (vanilla vs hardness-guided reward: metric vs speed-up
L / avg exit layer over the alpha sweep). The trained policies are saved by
agents.reinforce under runs/reinforce/benchmark-<task>-<reward>-a<alpha>-s<seed>-e<epochs>/.
Runtime is dominated by building the caches (first run: stage-1 training and a
pass over every split) and by the REINFORCE runs; timings are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agents.policies.heuristics import (
    BerxitExit,
    EntropyExit,
    LTEConfig,
    MaxProbExit,
    PatienceExit,
    max_prob,
    prediction_entropy,
    threshold_grid,
    train_lte,
)
from agents.evaluate import EvalResult, evaluate
from agents.policies import LearnedExit, OracleExit, StaticExit
from cee_env.cache import LayerCache

DEFAULT_TASKS = ("RTE", "MRPC", "SST2", "MCID", "StackOverflow")

# Swept methods, in table order: key -> (label, knob name).
METHODS: dict[str, tuple[str, str]] = {
    "static": ("Static exit at layer k", "k"),
    "deebert": ("DeeBERT (entropy)", "threshold"),
    "maxprob": ("Right-Tool (max prob)", "threshold"),
    "pabee": ("PABEE (patience)", "patience"),
    "berxit": ("BERxiT (learned LTE)", "threshold"),
    "consistentee-vanilla": ("ConsistentEE, vanilla reward (Eq 3)", "alpha"),
    "consistentee-hardness": ("ConsistentEE, hardness reward (Eq 4)", "alpha"),
    "consistentee-vanilla-thr": ("[extension] ConsistentEE Eq 3, alpha x threshold", "alpha,threshold"),
    "consistentee-hardness-thr": ("[extension] ConsistentEE Eq 4, alpha x threshold", "alpha,threshold"),
}
REFERENCES = {"full": "Backbone, full depth", "oracle": "Oracle (first correct layer, ceiling)"}

NOTE = ("Operating points are chosen on DEV: 'no loss' = the most saved layers with dev score >= the "
        "full-depth model's dev score; '<=1 pt' = the most saved layers with at most 1 point below it. "
        "Dev numbers are optimistic (chosen and reported on the same data); test numbers are the test "
        "scores of the knob chosen on dev. '-' = no knob value met the constraint. Scores are percentages "
        "of the task metric; (-x%) is saved layers = 1 - avg exit layer / L.")


@dataclass
class BenchmarkConfig:
    alphas: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)
    """ConsistentEE depth penalties (per layer) to sweep"""
    rewards: tuple[str, ...] = ("vanilla", "hardness")
    """ConsistentEE rewards: vanilla (Eq 3), hardness (Eq 4)"""
    seeds: tuple[int, ...] = (0,)
    """REINFORCE seeds per (reward, alpha); points are averaged over seeds"""
    epochs: int = 10
    """REINFORCE epochs per run (agents.reinforce's default is 30)"""
    rl_train_limit: int | None = 4000
    """train the policies on a fixed random subset of this many train instances (None: all)"""
    policy_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    """[extension] exit thresholds of every trained policy to sweep too (empty: off)"""
    grid: int = 41
    """threshold grid size of DeeBERT / Right-Tool / BERxiT (evenly spaced + as many train quantiles)"""
    lte: LTEConfig = field(default_factory=LTEConfig)
    """how the BERxiT LTE head is fitted"""
    out: str | None = None
    """output folder (default: runs/benchmark)"""
    plots: bool = True
    quiet: bool = False


# --------------------------------------------------------------------------- points
def _knob_key(knob: dict) -> str:
    return json.dumps(knob, sort_keys=True)


def make_point(task: str, method: str, knob: dict, split: str, res: EvalResult, seed: int | None = None) -> dict:
    return {"task": task, "method": method, "knob": knob, "seed": seed, "split": split,
            "metric_name": res.metric_name, "metric": res.metric, "accuracy": res.accuracy,
            "saved": res.saved_layers, "avg_exit": res.avg_exit_layer, "num_layers": res.num_layers,
            "n": res.n, "exit_hist": res.exit_hist}


def _eval_splits(caches: dict[str, LayerCache]) -> list[str]:
    """Labelled evaluation splits, dev first."""
    splits = [s for s in caches if s != "train" and caches[s].has_labels]
    return sorted(splits, key=lambda s: (s != "dev", s))


def _log(cfg: BenchmarkConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, flush=True)


def sweep_baselines(task: str, caches: dict[str, LayerCache], cfg: BenchmarkConfig) -> list[dict]:
    """Points of the full-depth model, the oracle and every heuristic / BERxiT knob value on every eval split."""
    train = caches["train"]
    L, C = train.num_layers, train.num_classes
    lp_train = np.asarray(train.log_probs[:, : L - 1])
    policies: list[tuple[str, dict, object]] = [("full", {}, StaticExit(L)), ("oracle", {}, OracleExit())]
    policies += [("static", {"k": k}, StaticExit(k)) for k in range(1, L + 1)]
    policies += [("deebert", {"threshold": t}, EntropyExit(t))
                 for t in threshold_grid(prediction_entropy(lp_train), 0.0, float(np.log(C)), cfg.grid)]
    policies += [("maxprob", {"threshold": t}, MaxProbExit(t))
                 for t in threshold_grid(max_prob(lp_train), 1.0 / C, 1.0, cfg.grid)]
    policies += [("pabee", {"patience": p}, PatienceExit(p)) for p in range(1, max(L, 2))]
    t0 = time.time()
    head = train_lte(train, cfg.lte)
    lte_train = BerxitExit(head, 0.5).scores(train)[:, : L - 1]
    _log(cfg, f"  [{task}] BERxiT LTE head fitted in {time.time() - t0:.1f} s "
              f"(train-cache mean score {lte_train.mean():.3f}, train accuracy of the layers "
              f"{(train.preds == np.asarray(train.labels)[:, None]).mean():.3f})")
    policies += [("berxit", {"threshold": t}, BerxitExit(head, t))
                 for t in threshold_grid(lte_train, 0.0, 1.0, cfg.grid)]
    points = []
    for split in _eval_splits(caches):
        for method, knob, pol in policies:
            points.append(make_point(task, method, knob, split, evaluate(pol, caches[split])))
    return points


def _env_id(task: str) -> str:
    import gymnasium as gym

    import cee_env  # noqa: F401  (registers the envs)

    return f"cee/{task}-v0" if f"cee/{task}-v0" in gym.registry else "cee/Synthetic-v0"


def subset_cache(cache: LayerCache, limit: int | None, seed: int = 0) -> LayerCache:
    """A fixed random subset of ``limit`` instances (the cache itself when it is not larger)."""
    if not limit or cache.num_instances <= limit:
        return cache
    idx = np.sort(np.random.default_rng(seed).choice(cache.num_instances, limit, replace=False))
    return LayerCache(states=np.ascontiguousarray(cache.states[idx]), log_probs=np.ascontiguousarray(cache.log_probs[idx]),
                      labels=np.asarray(cache.labels)[idx], task=cache.task, split=cache.split,
                      label_names=cache.label_names, metric=cache.metric,
                      fingerprint=f"{cache.fingerprint}-subset{limit}-s{seed}", meta=dict(cache.meta))


def sweep_consistentee(task: str, caches: dict[str, LayerCache], cfg: BenchmarkConfig,
                       timing: dict | None = None) -> list[dict]:
    """Train one policy per (reward, alpha, seed) and score it at threshold 0.5 (and the extension thresholds)."""
    from agents.reinforce import Args, train

    rl_caches = dict(caches)
    rl_caches["train"] = subset_cache(caches["train"], cfg.rl_train_limit)
    env, splits, points = _env_id(task), _eval_splits(caches), []
    run_secs = []
    for reward in cfg.rewards:
        for alpha in cfg.alphas:
            for seed in cfg.seeds:
                t0 = time.time()
                args = Args(env=env, reward=reward, alpha=float(alpha), epochs=cfg.epochs, seed=int(seed),
                            eval_every=max(1, cfg.epochs), quiet=True,
                            run_name=f"benchmark-{task}-{reward}-a{alpha:g}-s{seed}-e{cfg.epochs}")
                policy = train(args, rl_caches)["policy"]
                run_secs.append(time.time() - t0)
                for split in splits:
                    res = evaluate(policy, caches[split])
                    points.append(make_point(task, f"consistentee-{reward}", {"alpha": float(alpha)}, split, res, seed))
                    for thr in cfg.policy_thresholds:
                        r = evaluate(LearnedExit(policy.net, float(thr)), caches[split])
                        points.append(make_point(task, f"consistentee-{reward}-thr",
                                                 {"alpha": float(alpha), "threshold": float(thr)}, split, r, seed))
                dev = next(p for p in points[::-1] if p["method"] == f"consistentee-{reward}" and p["split"] == splits[0])
                _log(cfg, f"  [{task}] ConsistentEE {reward:<8} alpha={alpha:<6g} seed={seed}: {splits[0]} "
                          f"{dev['metric_name']} {100 * dev['metric']:5.1f}  saved {100 * dev['saved']:5.1f}%  "
                          f"({run_secs[-1]:.0f} s)")
    if timing is not None:
        timing["reinforce_runs"] = len(run_secs)
        timing["reinforce_s_per_run"] = round(float(np.mean(run_secs)), 1) if run_secs else 0.0
        timing["reinforce_train_instances"] = rl_caches["train"].num_instances
    return points


def aggregate_seeds(points: list[dict]) -> list[dict]:
    """One point per (task, method, knob, split): metric, accuracy, saved and avg exit averaged over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[(p["task"], p["method"], _knob_key(p["knob"]), p["split"])].append(p)
    out = []
    for g in groups.values():
        q = {k: v for k, v in g[0].items() if k not in ("seed", "exit_hist")}
        for k in ("metric", "accuracy", "saved", "avg_exit"):
            q[k] = float(np.mean([p[k] for p in g]))
        q["metric_std"] = float(np.std([p["metric"] for p in g]))
        q["seeds"] = [p["seed"] for p in g]
        out.append(q)
    return out


def select_operating_point(points: list[dict], reference: float, max_drop: float) -> dict | None:
    """The point with the most saved layers among those with metric >= reference - max_drop.

    Ties go to the higher metric, then to the earlier point. None when no point qualifies.
    """
    ok = [(i, p) for i, p in enumerate(points) if p["metric"] >= reference - max_drop - 1e-9]
    if not ok:
        return None
    return max(ok, key=lambda ip: (round(ip[1]["saved"], 12), round(ip[1]["metric"], 12), -ip[0]))[1]


def operating_points(points: list[dict], task: str) -> dict:
    """For every method of ``task``: the knob chosen on dev for 'no loss' and '<=1 pt', with its dev and test points."""
    mine = [p for p in points if p["task"] == task]
    by = {(p["method"], _knob_key(p["knob"]), p["split"]): p for p in mine}
    full = by.get(("full", "{}", "dev"))
    if full is None:
        raise ValueError(f"{task}: no dev evaluation of the full-depth model")
    splits = sorted({p["split"] for p in mine}, key=lambda s: (s != "dev", s))
    out: dict = {"reference_dev": full["metric"]}
    for ref in REFERENCES:
        out[ref] = {s: by.get((ref, "{}", s)) for s in splits}
    for method in METHODS:
        dev_pts = [p for p in mine if p["method"] == method and p["split"] == "dev"]
        if not dev_pts:
            continue
        out[method] = {}
        for name, drop in (("no_loss", 0.0), ("max1", 0.01)):
            chosen = select_operating_point(dev_pts, full["metric"], drop)
            out[method][name] = None if chosen is None else {
                "knob": chosen["knob"], **{s: by.get((method, _knob_key(chosen["knob"]), s)) for s in splits}}
    return out


# --------------------------------------------------------------------------- table
def _cell(p: dict | None) -> str:
    return "-" if p is None else f"{100 * p['metric']:.1f} (-{100 * p['saved']:.0f}%)"


def markdown_table(ops: dict[str, dict], tasks: list[str], split: str, meta: dict[str, dict]) -> str:
    """Table 3 layout: rows = methods (two operating points each), columns = tasks, average score, average saved."""
    tasks = [t for t in tasks if split in ops[t]["full"] and ops[t]["full"][split] is not None]
    if not tasks:
        return ""
    head = [f"{t} {meta[t]['metric_name']}" for t in tasks]
    lines = [f"| method ({split}) | " + " | ".join(head) + " | avg score | avg saved |",
             "|---" * (len(tasks) + 3) + "|"]

    def row(label: str, cells: list[dict | None]) -> str:
        have = [c for c in cells if c is not None]
        mark = "" if len(have) == len(cells) else f" ({len(have)}/{len(cells)} tasks)"
        avg_s = f"{100 * np.mean([c['metric'] for c in have]):.1f}{mark}" if have else "-"
        avg_v = f"{100 * np.mean([c['saved'] for c in have]):.0f}%{mark}" if have else "-"
        return f"| {label} | " + " | ".join(_cell(c) for c in cells) + f" | {avg_s} | {avg_v} |"

    Ls = sorted({meta[t]["num_layers"] for t in tasks})
    lines.append(row(f"{REFERENCES['full']} ({'/'.join(map(str, Ls))} layers)", [ops[t]["full"][split] for t in tasks]))
    for method, (label, knob) in METHODS.items():
        if not any(method in ops[t] for t in tasks):
            continue
        for name, tag in (("no_loss", "no loss"), ("max1", "<=1 pt loss")):
            cells = []
            for t in tasks:
                op = ops[t].get(method, {}).get(name)
                cells.append(None if op is None else op.get(split))
            lines.append(row(f"{label}, {tag}", cells))
    lines.append(row(REFERENCES["oracle"], [ops[t]["oracle"][split] for t in tasks]))
    return "\n".join(lines)


def knob_table(ops: dict[str, dict], tasks: list[str]) -> str:
    """Which knob value each operating point chose (on dev)."""
    lines = ["| method | operating point | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for method, (label, _) in METHODS.items():
        if not any(method in ops[t] for t in tasks):
            continue
        for name, tag in (("no_loss", "no loss"), ("max1", "<=1 pt")):
            cells = []
            for t in tasks:
                op = ops[t].get(method, {}).get(name)
                cells.append("-" if op is None else ", ".join(f"{k}={v:g}" for k, v in op["knob"].items()))
            lines.append(f"| {label} | {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
_STYLE = {
    "static": dict(color="0.5", ls="--", marker="s", ms=3),
    "deebert": dict(color="tab:blue", marker=".", ms=3),
    "maxprob": dict(color="tab:cyan", marker=".", ms=3),
    "pabee": dict(color="tab:green", marker="^", ms=4),
    "berxit": dict(color="tab:purple", marker=".", ms=3),
    "consistentee-vanilla": dict(color="tab:orange", marker="o", ms=5),
    "consistentee-hardness": dict(color="tab:red", marker="o", ms=5),
    "consistentee-vanilla-thr": dict(color="tab:orange", ls="none", marker="x", ms=3, alpha=0.35),
    "consistentee-hardness-thr": dict(color="tab:red", ls="none", marker="x", ms=3, alpha=0.35),
}


def _pareto(pts: list[dict]) -> list[dict]:
    """Upper-right frontier (saved, metric) of a cloud of points, for the extension curves."""
    front, best = [], -np.inf
    for p in sorted(pts, key=lambda p: (-p["saved"], -p["metric"])):
        if p["metric"] > best:
            front.append(p)
            best = p["metric"]
    return front[::-1]


def plot_curves(points: list[dict], task: str, path: Path) -> None:
    """Metric vs saved layers for every method, one panel per evaluation split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [p for p in points if p["task"] == task]
    splits = sorted({p["split"] for p in mine}, key=lambda s: (s != "dev", s))
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits) + 3.5, 5.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        sp = [p for p in mine if p["split"] == split]
        full = next(p for p in sp if p["method"] == "full")
        ax.axhline(100 * full["metric"], color="k", lw=0.8, label=f"full depth ({100 * full['metric']:.1f})")
        ax.axhspan(100 * full["metric"] - 1, 100 * full["metric"], color="k", alpha=0.06, label="within 1 point")
        for method, (label, _) in METHODS.items():
            pts = [p for p in sp if p["method"] == method]
            if not pts:
                continue
            style = dict(_STYLE.get(method, {}))
            if method.endswith("-thr"):
                ax.plot([100 * p["saved"] for p in pts], [100 * p["metric"] for p in pts], **style, label=label)
                front = _pareto(pts)
                ax.plot([100 * p["saved"] for p in front], [100 * p["metric"] for p in front],
                        color=style["color"], ls=":", lw=1)
                continue
            pts = sorted(pts, key=lambda p: (p["saved"], p["metric"]))
            ax.plot([100 * p["saved"] for p in pts], [100 * p["metric"] for p in pts], lw=1.2, label=label, **style)
        orc = next((p for p in sp if p["method"] == "oracle"), None)
        if orc:
            ax.plot([100 * orc["saved"]], [100 * orc["metric"]], "k*", ms=11, label="oracle (ceiling)")
        lo = min(100 * full["metric"] - 15, min(100 * p["metric"] for p in sp if p["method"] != "oracle") - 1)
        ax.set_ylim(max(0, lo), min(100, (100 * orc["metric"] if orc else 100) + 2))
        ax.set_xlim(-2, 100)
        ax.set_xlabel("saved layers (%) = 1 - avg exit layer / L")
        ax.set_ylabel(f"{full['metric_name']} (%)")
        ax.set_title(f"{task} {split} (L={full['num_layers']}, n={full['n']})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_ablation(points: list[dict], tasks: list[str], path: Path, split: str = "dev") -> None:
    """The paper's Figure 4: vanilla (Eq 3) vs hardness-guided (Eq 4) reward, metric vs speed-up over the alpha sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sp = [p for p in points if p["task"] == task and p["split"] == split]
        full = next((p for p in sp if p["method"] == "full"), None)
        if full is not None:
            ax.axhline(100 * full["metric"], color="k", lw=0.8, ls="--", label="full depth")
        for reward, color in (("vanilla", "tab:orange"), ("hardness", "tab:red")):
            pts = sorted((p for p in sp if p["method"] == f"consistentee-{reward}"), key=lambda p: p["avg_exit"])
            if not pts:
                continue
            x = [p["num_layers"] / p["avg_exit"] for p in pts]
            y = [100 * p["metric"] for p in pts]
            ax.plot(x, y, "o-", color=color, label=f"{reward} reward ({'Eq 3' if reward == 'vanilla' else 'Eq 4'})")
            for xi, yi, p in zip(x, y, pts):
                ax.annotate(f"{p['knob']['alpha']:g}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speed-up (L / avg exit layer)")
        ax.set_ylabel(f"{full['metric_name'] if full else 'metric'} (%)")
        ax.set_title(f"{task} {split}: reward ablation (labels = alpha)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _save_fig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- driver
def run_benchmark(caches_by_task: dict[str, dict[str, LayerCache]], cfg: BenchmarkConfig | None = None,
                  timings: dict[str, dict] | None = None) -> dict:
    """Run the whole comparison on given caches ({task: {"train", "dev"[, "test"]}}); write and return the results.

    Returns {"points", "points_mean", "operating_points", "tables": {"dev", "test"}, "markdown", "files", ...}.
    """
    from backbones.paths import runs_dir

    cfg = cfg or BenchmarkConfig()
    out_dir = Path(cfg.out) if cfg.out else runs_dir() / "benchmark"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {t: dict(v) for t, v in (timings or {}).items()}
    tasks, points, meta = list(caches_by_task), [], {}
    for task, caches in caches_by_task.items():
        for need in ("train", "dev"):
            if need not in caches:
                raise ValueError(f"{task}: caches need a {need!r} split; got {sorted(caches)}")
            if not caches[need].has_labels:
                raise ValueError(f"{task}/{need}: the cache has no labels")
        tm = timings.setdefault(task, {})
        t0 = time.time()
        _log(cfg, f"[{task}] baselines: {', '.join(_eval_splits(caches))} "
                  f"(L={caches['dev'].num_layers}, train n={caches['train'].num_instances}, dev n={caches['dev'].num_instances})")
        points += sweep_baselines(task, caches, cfg)
        tm["baselines_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        if cfg.alphas and cfg.rewards and cfg.seeds:
            points += sweep_consistentee(task, caches, cfg, tm)
        tm["consistentee_s"] = round(time.time() - t0, 1)
        dev_full = next(p for p in points if p["task"] == task and p["method"] == "full" and p["split"] == "dev")
        meta[task] = {"num_layers": dev_full["num_layers"], "metric_name": dev_full["metric_name"],
                      "n": {s: c.num_instances for s, c in caches.items()}}
        _log(cfg, f"[{task}] done: baselines {tm['baselines_s']:.0f} s, ConsistentEE {tm['consistentee_s']:.0f} s"
                  + (f" ({tm['reinforce_runs']} runs, {tm['reinforce_s_per_run']:.0f} s each)" if tm.get("reinforce_runs") else ""))
    mean_pts = aggregate_seeds(points)
    ops = {t: operating_points(mean_pts, t) for t in tasks}
    tables = {s: markdown_table(ops, tasks, s, meta) for s in ("dev", "test")}
    knobs = knob_table(ops, tasks)
    md = [f"# Accuracy-speed comparison on the stage-1 backbone ({', '.join(tasks)})", "", NOTE, ""]
    for s in ("dev", "test"):
        if tables[s]:
            md += [f"## {s}", "", tables[s], ""]
    md += ["## Knob values chosen on dev", "", knobs, ""]
    markdown = "\n".join(md)
    files = {"table": out_dir / "table.md", "results": out_dir / "results.json"}
    _write_text(files["table"], markdown)
    if cfg.plots:
        for t in tasks:
            files[f"curves_{t}"] = out_dir / f"{t}_curves.png"
            plot_curves(mean_pts, t, files[f"curves_{t}"])
        if cfg.alphas and cfg.rewards and cfg.seeds:
            files["ablation"] = out_dir / "fig4_reward_ablation.png"
            plot_ablation(mean_pts, tasks, files["ablation"])
    config = asdict(cfg)
    result = {"note": NOTE, "config": config, "tasks": meta, "timing": timings, "operating_points": ops,
              "tables": tables, "knobs": knobs, "points": points, "points_mean": mean_pts,
              "files": {k: str(v) for k, v in files.items()}}
    _write_text(files["results"], json.dumps(result, indent=1, default=_json_default))
    result["markdown"] = markdown
    return result


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"{flag} expects TASK=PATH; got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_args(argv=None) -> argparse.Namespace:
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks (default: %(default)s)")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in d.alphas),
                   help="ConsistentEE alphas to sweep (default: %(default)s); empty string: no ConsistentEE runs")
    p.add_argument("--rewards", default=",".join(d.rewards), help="ConsistentEE rewards (default: %(default)s)")
    p.add_argument("--seeds", default="0", help="REINFORCE seeds; points are averaged over them (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="REINFORCE epochs per run (default: %(default)s; agents.reinforce uses 30)")
    p.add_argument("--rl-train-limit", type=int, default=d.rl_train_limit,
                   help="train policies on a fixed random subset of this many train instances; 0 = all (default: %(default)s)")
    p.add_argument("--policy-thresholds", default=",".join(f"{t:g}" for t in d.policy_thresholds),
                   help="[extension] exit thresholds of the trained policies to sweep as well; empty string: off "
                        "(default: %(default)s). The paper's rule is 0.5.")
    p.add_argument("--grid", type=int, default=d.grid,
                   help="threshold grid size for DeeBERT / Right-Tool / BERxiT (default: %(default)s)")
    p.add_argument("--lte-loss", choices=["mse", "bce"], default=d.lte.loss,
                   help="loss of the BERxiT LTE head: mse (BERxiT's code) or bce (default: %(default)s)")
    p.add_argument("--lte-epochs", type=int, default=d.lte.epochs, help="LTE head epochs (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="data directory (default $CEE_DATA_DIR or ../shared/data)")
    p.add_argument("--test-file", action="append", metavar="TASK=PATH",
                   help="labelled test file for a task (repeatable); its split is reported with the dev-chosen knobs")
    p.add_argument("--checkpoint", action="append", metavar="TASK=PATH",
                   help="stage-1 checkpoint for a task (repeatable; default: the task's default, trained if missing)")
    p.add_argument("--out", default=None, help="output folder (default: runs/benchmark)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: %(default)s; small policy nets gain nothing from more)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from agents.runtime import torch_threads
    from agents.reinforce import Args, make_caches

    a = parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    tests, ckpts = _pairs(a.test_file, "--test-file"), _pairs(a.checkpoint, "--checkpoint")
    for k in list(tests) + list(ckpts):
        if k not in tasks:
            raise SystemExit(f"--test-file/--checkpoint names task {k!r}, which is not in --tasks {tasks}")
    cfg = BenchmarkConfig(alphas=_floats(a.alphas), rewards=tuple(r for r in a.rewards.split(",") if r.strip()),
                          seeds=tuple(int(s) for s in a.seeds.split(",") if s.strip()), epochs=a.epochs,
                          rl_train_limit=a.rl_train_limit or None, policy_thresholds=_floats(a.policy_thresholds),
                          grid=a.grid, lte=LTEConfig(loss=a.lte_loss, epochs=a.lte_epochs), out=a.out,
                          plots=not a.no_plots)
    t_all = time.time()
    caches_by_task, timings = {}, {}
    for task in tasks:
        t0 = time.time()
        print(f"[{task}] loading (or building) the layer caches ...", flush=True)
        caches_by_task[task] = make_caches(Args(env=f"cee/{task}-v0", data_dir=a.data_dir, test_file=tests.get(task),
                                                checkpoint=ckpts.get(task)))
        timings[task] = {"caches_s": round(time.time() - t0, 1)}
        print(f"[{task}] caches ready in {timings[task]['caches_s']:.0f} s", flush=True)
    with torch_threads(a.threads):  # the caches above were built with every core
        res = run_benchmark(caches_by_task, cfg, timings)
    print("\n" + res["markdown"])
    print("timing (s):")
    for t, tm in res["timing"].items():
        print(f"  {t}: " + ", ".join(f"{k} {v}" for k, v in tm.items()))
    print(f"  total {time.time() - t_all:.0f} s")
    print("\nwritten: " + ", ".join(res["files"].values()))
    return res


if __name__ == "__main__":
    main()
