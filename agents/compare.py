"""Compare RL algorithms on the early-exit environment under one budget of env steps.

    python -m agents.compare --env cee/RTE-v0 --algos reinforce,ppo,a2c,dqn --seeds 3
    python -m agents.compare --env cee/Synthetic-v0 --algos reinforce,ppo --seeds 1 --budget 20000

Every algorithm is trained once per seed on the same training cache (built once; on
cee/Synthetic-v0 with seed 0, so seeds vary only the agents), with the same reward
and alpha, and scored by the shared evaluator on dev. One *env step* is one layer
decision of one instance (SB3's ``num_timesteps``).

Budget: REINFORCE stops once its trajectories have taken the budget's env steps
(mid-epoch if need be; its epsilon decays over the budget). SB3's on-policy
algorithms finish their last rollout, so they may overshoot by up to
n_steps * n_envs steps. The table shows the measured env steps.

Writes runs/compare/<env>/results.json and compare.png (left: mean training reward
vs env steps per algorithm, averaged over seeds; right: dev metric vs saved layers,
one point per algorithm and seed, plus the full-depth model and the oracle).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

import cee_env  # noqa: F401  (registers cee/<Task>-v0)
from agents import reinforce, sb3
from agents.runtime import parse_dataclass_args, tail_mean, write_json
from agents.evaluate import evaluate
from agents.policies import OracleExit, StaticExit
from backbones.paths import runs_dir
from cee_env.cache import LayerCache

ALGOS = ("reinforce", *sb3.ALGOS)


@dataclass
class Args:
    env: str = "cee/RTE-v0"
    """environment id (cee/<Task>-v0 or cee/Synthetic-v0)"""
    algos: str = "reinforce,ppo,a2c,dqn"
    """comma-separated algorithms: reinforce, ppo, a2c, dqn"""
    seeds: int = 3
    """seeds per algorithm (0, 1, ...)"""
    budget: int = 200_000
    """env steps (layer decisions) per run"""
    reward: str = "hardness"
    """hardness (Eq 4), vanilla (Eq 3) or hardness_weighted"""
    alpha: float = 0.05
    """depth penalty per layer"""
    n_envs: int = 8
    """SB3: env copies in the DummyVecEnv"""
    checkpoint: str | None = None
    """stage-1 checkpoint directory (default: the task's default)"""
    data_dir: str | None = None
    """data directory (default $CEE_DATA_DIR or ../shared/data)"""
    name: str | None = None
    """output folder under runs/compare (default: the env name, e.g. RTE-v0)"""
    quiet: bool = False
    """print only the final table"""


def run_one(algo: str, seed: int, args: Args, caches: dict[str, LayerCache]) -> dict:
    """Train one algorithm with one seed; returns a row of the comparison."""
    env_name = args.env.split("/")[-1]
    run_name = f"compare-{env_name}-{algo}-s{seed}"
    t0 = time.time()
    if algo == "reinforce":
        ra = reinforce.Args(env=args.env, reward=args.reward, alpha=args.alpha, seed=seed, quiet=True,
                            run_name=run_name, checkpoint=args.checkpoint, data_dir=args.data_dir)
        ra.total_env_steps = args.budget
        out = reinforce.train(ra, caches)
        res = out["results"]
        env_steps, curve = res["env_steps"], [(float(x), float(y)) for x, y in res["reward_curve"]]
        extra = {"epochs": res["epochs"], "updates": res["updates"]}
    else:
        sa = sb3.Args(algo=algo, env=args.env, reward=args.reward, alpha=args.alpha, total_timesteps=args.budget,
                      n_envs=args.n_envs, eval_every=max(1, args.budget // 5), seed=seed, quiet=True,
                      run_name=run_name, checkpoint=args.checkpoint, data_dir=args.data_dir)
        out = sb3.train(sa, caches)
        res = out["results"]
        env_steps, curve = res["env_steps"], [(float(x), float(y)) for x, y in res["reward_curve"]]
        extra = {"episodes": res["episodes"]}
    wall = time.time() - t0
    name = out["policy"].name
    row = {"algo": algo, "seed": seed, "run_dir": str(out["run_dir"]), "env_steps": env_steps,
           "train_seconds": res["train_seconds"], "wall_seconds": round(wall, 1),
           "final_reward": tail_mean(curve, 0.1), "reward_curve": curve, **extra}
    for split in ("dev", "test"):
        if split in res:
            row[split] = res[split][name]
    return row


def _mean_std(xs) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarise(rows: list[dict]) -> dict:
    out = {}
    for algo in dict.fromkeys(r["algo"] for r in rows):
        rs = [r for r in rows if r["algo"] == algo]
        s = {"seeds": len(rs)}
        for key, vals in (("dev_metric", [r["dev"]["metric"] for r in rs]),
                          ("dev_saved_layers", [r["dev"]["saved_layers"] for r in rs]),
                          ("final_reward", [r["final_reward"] for r in rs]),
                          ("env_steps", [r["env_steps"] for r in rs]),
                          ("wall_seconds", [r["wall_seconds"] for r in rs])):
            s[f"{key}_mean"], s[f"{key}_std"] = _mean_std(vals)
        out[algo] = s
    return out


def format_table(summary: dict, reference: dict, metric_name: str) -> str:
    head = f"{'algo':<11} {'dev ' + metric_name:>16} {'saved layers':>16} {'final reward':>17} {'env steps':>10} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for name, r in reference.items():
        lines.append(f"{name:<11} {100 * r['metric']:>10.1f}       {100 * r['saved_layers']:>10.1f}%")
    for algo, s in summary.items():
        lines.append(
            f"{algo:<11} {100 * s['dev_metric_mean']:>8.1f} ± {100 * s['dev_metric_std']:<5.1f}"
            f" {100 * s['dev_saved_layers_mean']:>8.1f}% ± {100 * s['dev_saved_layers_std']:<4.1f}"
            f" {s['final_reward_mean']:>8.3f} ± {s['final_reward_std']:<6.3f}"
            f" {s['env_steps_mean']:>10,.0f} {s['wall_seconds_mean']:>7.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], reference: dict, metric_name: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    colors = {a: f"C{i}" for i, a in enumerate(algos)}
    xmax = max((c[-1][0] for r in rows if (c := r["reward_curve"])), default=1.0)
    grid = np.linspace(0, xmax, 200)
    for algo in algos:
        ys = []
        for r in rows:
            if r["algo"] == algo and r["reward_curve"]:
                x, y = np.asarray(r["reward_curve"], dtype=float).T
                ys.append(np.where((grid >= x[0]) & (grid <= x[-1]), np.interp(grid, x, y), np.nan))
        if ys:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns before the first point
                m = np.nanmean(np.stack(ys), 0)
            ax1.plot(grid, m, color=colors[algo], label=f"{algo} (n={len(ys)})")
    ax1.set_xlabel("env steps")
    ax1.set_ylabel("mean training reward")
    ax1.set_title("training reward (mean over seeds)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    marks = {"full-depth": ("k", "*"), "oracle": ("gray", "P")}
    for name, r in reference.items():
        c, mk = marks.get(name, ("k", "x"))
        ax2.scatter([100 * r["saved_layers"]], [100 * r["metric"]], color=c, marker=mk, s=160, label=name, zorder=1)
    for i, algo in enumerate(algos):
        pts = [(100 * r["dev"]["saved_layers"], 100 * r["dev"]["metric"]) for r in rows if r["algo"] == algo]
        ax2.scatter(*zip(*pts), color=colors[algo], marker="osD^v<>"[i % 7], label=algo, alpha=0.75, zorder=3)
    ax2.set_xlabel("saved layers (%)")
    ax2.set_ylabel(f"dev {metric_name} (%)")
    ax2.set_title("dev quality vs speed (one point per seed)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def compare(args: Args, caches: dict[str, LayerCache] | None = None) -> dict:
    """Run every (algo, seed); returns the results dict written to runs/compare/<name>/results.json."""
    algos = [a.strip().lower() for a in args.algos.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALGOS]
    if bad or not algos:
        raise ValueError(f"--algos must name some of {ALGOS}; got {args.algos!r}")
    if args.seeds < 1 or args.budget < 1:
        raise ValueError("--seeds and --budget must be >= 1")
    gym.spec(args.env)  # a clear error for an unknown env id
    if caches is None:
        caches = reinforce.make_caches(reinforce.Args(env=args.env, seed=0, checkpoint=args.checkpoint,
                                                      data_dir=args.data_dir))
    out_dir = runs_dir() / "compare" / (args.name or args.env.split("/")[-1])
    rows = []
    for algo in algos:
        for seed in range(args.seeds):
            if not args.quiet:
                print(f"[compare] {algo} seed {seed} ...", flush=True)
            rows.append(run_one(algo, seed, args, caches))
            if not args.quiet:
                r = rows[-1]
                print(f"[compare] {algo} seed {seed}: dev {100 * r['dev']['metric']:.1f} saved "
                      f"{100 * r['dev']['saved_layers']:.1f}% in {r['wall_seconds']:.0f} s", flush=True)
    L = caches["train"].num_layers
    reference = {"full-depth": evaluate(StaticExit(L), caches["dev"]).to_dict(),
                 "oracle": evaluate(OracleExit(), caches["dev"]).to_dict()}
    metric_name = reference["full-depth"]["metric_name"]
    summary = summarise(rows)
    results = {"args": asdict(args), "env": args.env, "budget": args.budget, "num_layers": L,
               "metric_name": metric_name, "reference": {"dev": reference}, "summary": summary, "runs": rows}
    write_json(out_dir / "results.json", results)
    plot(rows, reference, metric_name, f"{args.env}: {args.reward} reward, alpha={args.alpha:g}, budget {args.budget:,} "
         f"env steps", out_dir / "compare.png")
    table = format_table(summary, reference, metric_name)
    print(table)
    if not args.quiet:
        print(f"\nresults.json and compare.png: {out_dir}")
    results["table"], results["out_dir"] = table, out_dir
    return results


def parse_args(argv=None) -> Args:
    return parse_dataclass_args(Args, argv, __doc__)


if __name__ == "__main__":
    compare(parse_args())
