"""Compare RL algorithms on the early-exit environment: same env, same budget, 5 seeds, IQM with 95% CIs.

    python -m agents.compare --env cee/RTE-v0 --algos reinforce,ppo,a2c,dqn
    python -m agents.compare --env cee/MCID-v0 --obs confidence --reward consistency --alpha 0.01

Every algorithm is trained once per seed on the same calib cache (rows the backbone never
saw; ``--train-split train`` for the rows it was fitted on), with the same observation
mode, reward and alpha, and scored by the shared evaluator with its own greedy rule (no
knob is chosen) on the test sets: the task's dev file and any ``--test-file``. One *env
step* is one layer decision of one instance (SB3's ``num_timesteps``).

Per algorithm and test set it reports, over seeds, the interquartile mean (IQM) and a
95% stratified-bootstrap confidence interval (rliable, Agarwal et al. 2021) of: the test
return (the mean exit reward, the objective every algorithm maximises), the task metric
and the saved layers.

Budget: REINFORCE stops once its trajectories have taken the budget's env steps
(mid-epoch if need be; its epsilon decays over the budget). SB3's on-policy
algorithms finish their last rollout, so they may overshoot by up to
n_steps * n_envs steps. The table shows the measured env steps.

Writes runs/compare/<name>/results.json and compare.png (training reward vs env steps;
IQM and CI of the test return per algorithm; test metric vs saved layers per seed). <name> is
``--name``, else the env, the backbone and each setting that differs from the defaults (e.g.
``MCID-v0-confidence-consistency-a0.01``), which also names its runs' folders: comparisons of other
settings never overwrite each other's policies or results.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import cee_env  # noqa: F401  (registers cee/<Task>-v0)
from agents import reinforce, sb3
from agents.parallel import check_workers, fit_map
from agents.runtime import DataArgs, settings_name, tail_mean
from backbones.cli import parse, user_errors
from backbones.files import write_json
from agents.evaluate import evaluate
from agents.policies import OracleExit, StaticExit
from backbones.paths import model_suffix, runs_dir
from cee_env.cache import LayerCache

ALGOS = ("reinforce", *sb3.ALGOS)


@dataclass
class Args(DataArgs):
    env: str = "cee/RTE-v0"
    """environment id (cee/<Task>-v0 or cee/Synthetic-v0)"""
    algos: str = "reinforce,ppo,a2c,dqn"
    """comma-separated algorithms: reinforce, ppo, a2c, dqn"""
    seeds: int = 5
    """seeds per algorithm (0, 1, ...)"""
    obs: str = "state_layer"
    """the env's observation mode, the same for every algorithm (state_layer, state, state_probs, confidence, state_confidence)"""
    budget: int = 200_000
    """env steps (layer decisions) per run"""
    reward: str = "hardness"
    """hardness (Eq 4), vanilla (Eq 3) or hardness_weighted"""
    alpha: float = 0.05
    """depth penalty per layer"""
    n_envs: int = 8
    """SB3: env copies in the DummyVecEnv"""
    name: str | None = None
    """output folder under runs/compare, and the stem of its runs' folders (default: the env name, e.g. RTE-v0,
    with -<model> for another --model and every other setting that differs from the defaults)"""
    quiet: bool = False
    """print only the final table"""
    workers: int = 0
    """run the (algo, seed) runs on this many local Ray workers (extra 'ray'); 0: one after another in this
    process. Results are the same either way"""
    ray_address: str | None = None
    """run them on the Ray cluster at this address (e.g. ray://head:10001 or auto) instead"""


SPELLED = ("env", "model", "obs", "reward", "alpha", "train_split", "budget", "n_envs")
"""Settings :func:`comparison_name` spells out when they differ from the defaults."""
NOT_COMPARED = ("algos", "seeds", "name", "workers", "ray_address")
"""Settings that pick which runs a comparison makes and where they run, not what each run learns."""


def comparison_name(args: Args) -> str:
    """The comparison's folder under runs/compare and the stem of its runs' folders: ``--name``, else the env,
    the backbone and every setting that changes the policies and differs from the defaults (e.g.
    ``RTE-v0-all-mpnet-base-v2-confidence-consistency-a0.02``), so that a comparison of other settings or on
    another backbone does not overwrite this one's policies and results."""
    if args.name:
        return args.name
    d = Args()
    parts = [args.env.split("/")[-1] + model_suffix(args.model)]
    if (args.obs, args.reward, args.alpha) != (d.obs, d.reward, d.alpha):
        parts.append(f"{args.obs}-{args.reward}-a{args.alpha:g}")
    if args.train_split != d.train_split:
        parts.append(args.train_split)
    if args.budget != d.budget:
        parts.append(f"b{args.budget}")
    if args.n_envs != d.n_envs:
        parts.append(f"envs{args.n_envs}")
    # any other setting that changes the runs (protocol, checkpoint, task file, data dir, ...): a short hash
    return settings_name(args, "-".join(parts), SPELLED + NOT_COMPARED)


def run_one(algo: str, seed: int, args: Args, caches: dict[str, LayerCache]) -> dict:
    """Train one algorithm with one seed; returns a row of the comparison."""
    run_name = f"compare-{comparison_name(args)}-{algo}-s{seed}"
    t0 = time.time()
    if algo == "reinforce":
        ra = reinforce.Args(env=args.env, reward=args.reward, alpha=args.alpha, obs=args.obs, seed=seed, quiet=True,
                            run_name=run_name, checkpoint=args.checkpoint, data_dir=args.data_dir, model=args.model)
        ra.total_env_steps = args.budget
        out = reinforce.train(ra, caches)
        res = out["results"]
        env_steps, curve = res["env_steps"], [(float(x), float(y)) for x, y in res["reward_curve"]]
        extra = {"epochs": res["epochs"], "updates": res["updates"]}
    else:
        sa = sb3.Args(algo=algo, env=args.env, reward=args.reward, alpha=args.alpha, obs=args.obs,
                      total_timesteps=args.budget,
                      n_envs=args.n_envs, eval_every=max(1, args.budget // 5), seed=seed, quiet=True,
                      run_name=run_name, checkpoint=args.checkpoint, data_dir=args.data_dir, model=args.model)
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
            row[split]["return"] = test_return(out["policy"], caches[split], args)
    return row


def test_return(policy, cache: LayerCache, args: Args) -> float:
    """Mean exit reward of the policy's greedy rule on a test cache: the env's objective, measured on test."""
    from agents.evaluate import first_exit
    from cee_env.env import EpisodeTables

    t = EpisodeTables.build(cache, args.reward, args.alpha, "state", 50.0, None)
    e = first_exit(np.asarray(policy.exit_mask(cache), dtype=bool))
    return float(t.reward[np.arange(cache.num_instances), e].mean())


METRICS = ("return", "metric", "saved_layers")


def interval_estimates(rows: list[dict], split: str, reps: int = 2000, seed: int = 0) -> dict:
    """IQM and 95% stratified-bootstrap CI over seeds of each algorithm's test return, metric, saved layers (rliable)."""
    from rliable import library as rly
    from rliable import metrics as rm

    out: dict = {}
    algos = list(dict.fromkeys(r["algo"] for r in rows if split in r))
    for key in METRICS:
        scores = {a: np.array([[r[split][key]] for r in rows if r["algo"] == a and split in r], dtype=float)
                  for a in algos}
        # rliable's StratifiedBootstrap draws its resamples from numpy's global RNG (update_indices calls
        # np.random.choice) whatever random_state says: seed it for these draws, then restore it, so that
        # the same runs always give the same intervals (serial or on Ray workers).
        global_state = np.random.get_state()
        np.random.seed(seed)
        try:
            with warnings.catch_warnings():  # arch deprecates the RandomState rliable passes
                warnings.simplefilter("ignore", FutureWarning)
                point, ci = rly.get_interval_estimates(scores, lambda x: np.array([rm.aggregate_iqm(x)]), reps=reps,
                                                       random_state=np.random.RandomState(seed))
        finally:
            np.random.set_state(global_state)
        for a in algos:
            out.setdefault(a, {})[key] = {"iqm": float(point[a][0]), "ci95": [float(ci[a][0, 0]), float(ci[a][1, 0])],
                                          "n": int(scores[a].shape[0])}
    return out


def format_table(iqm: dict, reference: dict, metric_name: str, split: str, rows: list[dict]) -> str:
    """IQM [95% CI] over seeds per algorithm on one test split, with the full-depth model and the oracle."""
    def cell(d: dict, scale: float, fmt: str) -> str:
        lo, hi = d["ci95"]
        return f"{scale * d['iqm']:{fmt}} [{scale * lo:{fmt}}, {scale * hi:{fmt}}]"

    head = (f"| {split}: algo | seeds | test return | test {metric_name} | saved layers | env steps | wall s / run |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in reference.items():
        lines.append(f"| {name} | | {r['return']:.3f} | {100 * r['metric']:.1f} | {100 * r['saved_layers']:.1f}% | | |")
    for algo, d in iqm.items():
        rs = [r for r in rows if r["algo"] == algo]
        lines.append(f"| {algo} | {d['metric']['n']} | {cell(d['return'], 1, '.3f')} | {cell(d['metric'], 100, '.1f')} | "
                     f"{cell(d['saved_layers'], 100, '.1f')}% | {np.mean([r['env_steps'] for r in rs]):,.0f} | "
                     f"{np.mean([r['wall_seconds'] for r in rs]):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], reference: dict, metric_name: str, title: str, path: Path, iqm: dict, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backbones.files import write_with

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(17, 4.5))
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
    for i, algo in enumerate(iqm):
        d = iqm[algo]["return"]
        ax3.errorbar([d["iqm"]], [i], xerr=[[d["iqm"] - d["ci95"][0]], [d["ci95"][1] - d["iqm"]]], fmt="o",
                     color=colors[algo], capsize=4)
    ax3.axvline(reference["full-depth"]["return"], color="k", lw=0.8, ls="--", label="full depth")
    ax3.set_yticks(range(len(iqm)), list(iqm))
    ax3.set_xlabel(f"{split} return (mean exit reward)")
    ax3.set_title("IQM over seeds, 95% bootstrap CI (rliable)")
    ax3.legend(fontsize=7)
    ax3.grid(alpha=0.3)
    marks = {"full-depth": ("k", "*"), "oracle": ("gray", "P")}
    for name, r in reference.items():
        c, mk = marks.get(name, ("k", "x"))
        ax2.scatter([100 * r["saved_layers"]], [100 * r["metric"]], color=c, marker=mk, s=160, label=name, zorder=1)
    for i, algo in enumerate(algos):
        pts = [(100 * r[split]["saved_layers"], 100 * r[split]["metric"]) for r in rows if r["algo"] == algo]
        ax2.scatter(*zip(*pts), color=colors[algo], marker="osD^v<>"[i % 7], label=algo, alpha=0.75, zorder=3)
    ax2.set_xlabel("saved layers (%)")
    ax2.set_ylabel(f"{split} {metric_name} (%)")
    ax2.set_title(f"{split} quality vs speed (one point per seed)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def compare(args: Args, caches: dict[str, LayerCache] | None = None) -> dict:
    """Run every (algo, seed); returns the results dict written to runs/compare/<name>/results.json."""
    algos = [a.strip().lower() for a in args.algos.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALGOS]
    if bad or not algos:
        raise ValueError(f"--algos must name some of {ALGOS}; got {args.algos!r}")
    if args.seeds < 1 or args.budget < 1:
        raise ValueError("--seeds and --budget must be >= 1")
    check_workers(args.workers, args.ray_address)
    reinforce.register_task_file(args)
    cee_env.env_task(args.env)  # registers cee/<Task>-v0 (a clear error for an unknown env id)
    if caches is None:
        caches = reinforce.make_caches(args)
    out_dir = runs_dir() / "compare" / comparison_name(args)
    jobs = [(algo, seed, args) for algo in algos for seed in range(args.seeds)]  # independent: any order, any worker
    rows = fit_map(run_one, jobs, [f"{algo}/seed{seed}" for algo, seed, _ in jobs], shared=caches, workers=args.workers,
                   address=args.ray_address, desc=None if args.quiet else f"[compare] {len(jobs)} runs")
    for r in rows if not args.quiet else ():
        print(f"[compare] {r['algo']} seed {r['seed']}: dev {100 * r['dev']['metric']:.1f} saved "
              f"{100 * r['dev']['saved_layers']:.1f}% return {r['dev']['return']:.3f} in {r['wall_seconds']:.0f} s")
    L = caches["train"].num_layers
    splits = [s for s in ("dev", "test") if s in caches and caches[s].has_labels]
    reference, iqm, tables = {}, {}, []
    for split in splits:
        reference[split] = {}
        for name, pol in (("full-depth", StaticExit(L)), ("oracle", OracleExit())):
            reference[split][name] = {**evaluate(pol, caches[split]).to_dict(),
                                      "return": test_return(pol, caches[split], args)}
        iqm[split] = interval_estimates(rows, split, seed=0)
    metric_name = reference["dev"]["full-depth"]["metric_name"]
    for split in splits:
        tables.append(format_table(iqm[split], reference[split], metric_name, split, rows))
    table = "\n\n".join(tables)
    results = {"args": asdict(args), "env": args.env, "budget": args.budget, "num_layers": L,
               "train_split": caches["train"].split, "train_instances": caches["train"].num_instances,
               "metric_name": metric_name, "reference": reference, "iqm": iqm, "runs": rows, "table": table}
    write_json(out_dir / "results.json", results)
    split = splits[-1]
    plot(rows, reference[split], metric_name, f"{args.env}: {args.obs} obs, {args.reward} reward, alpha={args.alpha:g}, "
         f"{args.seeds} seeds, {args.budget:,} env steps each, learned on {caches['train'].split}",
         out_dir / "compare.png", iqm[split], split)
    print(table)
    if not args.quiet:
        print(f"\nresults.json and compare.png: {out_dir}")
    results["out_dir"] = out_dir
    return results


def parse_args(argv=None) -> Args:
    return parse(Args, argv, __doc__)


@user_errors
def main(argv: list[str] | None = None) -> dict:
    return compare(parse_args(argv))


if __name__ == "__main__":
    main()
