"""ConsistentEE's iterative training (paper steps 2-5): policy and backbone in turn.

    python -m agents.cotrain --env cee/RTE-v0 --rounds 3
    python -m agents.cotrain --env cee/MRPC-v0 --alpha 0.1 --joint     # the joint variant (Eq 6 + Eq 5)
    ACCELERATE_USE_CPU=true python -m agents.cotrain --env cee/RTE-v0 \\
        --launcher "accelerate launch --multi_gpu --num_processes 2"    # backbone stage as DDP on 2 CPU processes

Round 0 starts from the stage-1 checkpoint (Eq 1). In round r:

1. caches and memorized layers (Eq 7) of the current backbone,
2. the policy trained with the backbone frozen (Eq 5, hardness reward; warm-started
   from the previous round's policy), evaluated on calib (where the stop rule reads it) and
   on dev (a test set, reported only) -> this round's numbers,
3. unless this is the last round or the run has converged: the policy frozen,
   backbone and classifiers fine-tuned with Eq 6 (cross-entropy only at the exit
   layer the policy picks) -> the next round's checkpoint.

With ``--joint`` step 3 is the paper's joint variant instead: backbone, classifiers
and policy trained together (Eq 6 at the exits the policy samples + Eq 5 with the
hardness reward, memorized layers from step 1); the next round's policy stage starts
from that jointly trained policy.

Stops after ``--rounds`` backbone updates, or earlier when the calib metric and exit
distribution change by less than ``--tol`` between rounds (calib: training rows no round's
backbone is fitted on; dev is a test set and is never read to stop). The stage-1 backbone
must leave calib rows out (the default: the task's holdout backbone), and every backbone
stage fits the same rows it did. Every step is
checkpointed under runs/cotrain/<name>/; running the same command again resumes.
At the end it writes the analysis: per-layer accuracy of the internal classifiers
on train and dev before and after (the paper's Figure 2, PNG + JSON) and the
paper's Table 1 (Spearman of memorized layer with final-layer loss and with
forgetting events counted over the stage-1 epochs).
"""
from __future__ import annotations

import math
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import cee_env  # noqa: F401
from agents import reinforce
from agents.evaluate import EvalResult
from agents.policies import StaticExit
from backbones.cli import UserError, parse, user_errors
from backbones.files import claim, read_json, resolve_stored, save_npy, stored_path, write_json, write_with
from backbones.paths import runs_dir
from cee_env.cache import LayerCache, get_cache
from cee_env.hardness import forgetting_events, memorized_layer, table1_correlation


@dataclass
class Args:
    env: str = "cee/RTE-v0"
    """environment id (cee/<Task>-v0)"""
    rounds: int = 3
    """backbone updates (Eq 6) at most; round 0 is the stage-1 backbone"""
    tol: float = 0.005
    """stop when the calib metric and the exit distribution (total variation) on calib both change less than this"""
    alpha: float = 0.05
    """depth penalty of the hardness reward (Eq 4)"""
    reward: str = "hardness"
    """reward of the policy stage: hardness, vanilla or hardness_weighted"""
    policy_epochs: int = 30
    """REINFORCE epochs per round"""
    backbone_epochs: int = 2
    """Eq 6 epochs per round (the paper: 2)"""
    backbone_lr: float = 3e-5
    """encoder learning rate of the Eq 6 stage (the paper: 3e-5)"""
    head_lr: float = 3e-4
    """internal classifiers' learning rate of the Eq 6 stage"""
    joint: bool = False
    """backbone stage trains the policy too (Eq 6 + Eq 5 together, the paper's joint variant)"""
    launcher: str = ""
    """run the backbone stage as a subprocess under this launcher, e.g. 'accelerate launch --multi_gpu --num_processes 2' (on a CPU-only machine with ACCELERATE_USE_CPU=true set)"""
    checkpoint: str | None = None
    """stage-1 checkpoint to start from, trained with calib rows held out (--holdout, or a subset task);
    None: the task's holdout backbone (trained if missing)"""
    data_dir: str | None = None
    """data directory; None: $CEE_DATA_DIR or ../shared/data"""
    seed: int = 0
    """random seed"""
    name: str | None = None
    """run folder name under runs/cotrain; None: <Task>-a<alpha>-s<seed>"""


def check_args(a: Args) -> None:
    """Raise a :class:`UserError` naming the first flag out of range."""
    finite = lambda x: math.isfinite(x)  # noqa: E731
    checks = [(a.rounds >= 0, "--rounds must be >= 0", a.rounds),
              (finite(a.tol) and a.tol >= 0, "--tol must be a finite number >= 0", a.tol),
              (finite(a.alpha) and a.alpha >= 0, "--alpha must be a finite number >= 0", a.alpha),
              (a.policy_epochs >= 1, "--policy-epochs must be >= 1", a.policy_epochs),
              (a.backbone_epochs >= 1, "--backbone-epochs must be >= 1", a.backbone_epochs),
              (finite(a.backbone_lr) and a.backbone_lr > 0, "--backbone-lr must be a finite number > 0", a.backbone_lr),
              (finite(a.head_lr) and a.head_lr > 0, "--head-lr must be a finite number > 0", a.head_lr)]
    for ok, msg, got in checks:
        if not ok:
            raise UserError(f"{msg}; got {got}")


def task_of(env_id: str) -> str:
    import gymnasium as gym

    try:
        return cee_env.env_task(env_id)
    except gym.error.Error as e:  # e.g. no such environment
        raise UserError(f"--env {env_id}: {e}") from None


def caches_for(task: str, ckpt: Path, data_dir: str | None) -> dict[str, LayerCache]:
    return {s: get_cache(task=task, split=s, checkpoint=ckpt, data_dir=data_dir) for s in ("train", "calib", "dev")}


# TrainConfig fields that say which training rows a backbone fits: every backbone stage keeps its init's.
FIT_ROWS = ("seed", "max_train_samples", "holdout", "folds", "fold", "train_file")


def fit_rows_of(ckpt: Path) -> dict:
    """The row-selecting settings ``ckpt`` was trained with; a :class:`UserError` if it held out no calib rows."""
    cfg = read_json(Path(ckpt) / "train_config.json", f"pass a checkpoint trained by backbones.train, not {ckpt}")
    rows = {k: cfg.get(k) for k in FIT_ROWS if cfg.get(k) is not None}
    if not (rows.get("holdout") or rows.get("max_train_samples")) or rows.get("folds"):
        raise UserError(f"{ckpt} held out no calib rows, and co-training stops on calib rows no backbone is fitted on; "
                        f"train one that does (python -m backbones.train --task {cfg.get('task')} --holdout 0.3) "
                        "or leave out --checkpoint")
    return rows


def layer_accuracy(cache: LayerCache) -> list[float]:
    return (cache.preds == np.asarray(cache.labels)[:, None]).mean(0).tolist()


def exit_tv(h1: list[int], h2: list[int]) -> float:
    """Total-variation distance between two exit histograms."""
    a, b = np.asarray(h1, float), np.asarray(h2, float)
    return 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())


def backbone_stage(args: Args, task: str, init: Path, policy_dir: Path, out: Path) -> Path:
    """Eq 6 with the policy frozen (or, with ``--joint``, Eq 6 + Eq 5 with the policy
    training too, on the memorized layers of ``init``); in-process, or under ``--launcher`` (DDP)."""
    from agents.rl.backbone_stage import StageConfig, run
    from backbones.train import is_complete

    if is_complete(out):
        return out
    extra = {}
    if args.joint:
        tr = get_cache(task=task, split="train", checkpoint=init, data_dir=args.data_dir)
        mem_file = out.parent / "memorized_train.npy"
        save_npy(mem_file, memorized_layer(tr.preds, tr.labels))
        extra = dict(memorized=str(mem_file), reward=args.reward, alpha=args.alpha)
    cfg = StageConfig(task=task, **fit_rows_of(init), init_from=str(init), objective="joint" if args.joint else "exit",
                      exit_policy=str(policy_dir), epochs=args.backbone_epochs, lr=args.backbone_lr,
                      head_lr=args.head_lr, warmup=0.0, data_dir=args.data_dir, out=str(out), **extra)
    if not args.launcher:
        return run(cfg)
    cmd = [*shlex.split(args.launcher), "-m", "agents.rl.backbone_stage"]
    for k, v in asdict(cfg).items():
        if v is not None:
            cmd += ["--" + k.replace("_", "-"), str(v)]
    print("running:", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


def run(args: Args) -> dict:
    check_args(args)
    task = task_of(args.env)
    from cee_env.cache import deployed_checkpoint

    stage1 = Path(args.checkpoint) if args.checkpoint else deployed_checkpoint(task, "holdout", args.data_dir, seed=args.seed)
    root = runs_dir() / "cotrain" / (args.name or f"{task}-a{args.alpha:g}-s{args.seed}")
    with claim(root, f"the co-training run {root}"):
        return _run(args, task, stage1, root)


# Args that do not change what a round computes (a resumed run may differ in them).
NOT_TRAINING = ("rounds", "tol", "launcher", "data_dir", "name")


def _run(args: Args, task: str, stage1: Path, root: Path) -> dict:
    state_file = root / "state.json"
    fix = f"delete {root} (or pass --name NEW) to start over"
    state = read_json(state_file, fix) if state_file.is_file() else {"rounds": []}
    if state["rounds"]:
        saved = read_json(root / "args.json", fix) if (root / "args.json").is_file() else {}
        diff = [f"{k} {saved[k]!r} -> {v!r}" for k, v in asdict(args).items()
                if k not in NOT_TRAINING and k in saved and saved[k] != v]
        if diff:
            raise UserError(f"{root} holds a co-training run with other settings: {'; '.join(diff)}; rerun with its "
                            f"settings to resume it, or {fix}")
        print(f"resuming {root} after round {len(state['rounds']) - 1}")
    fit_rows_of(stage1)  # a backbone without held-out calib rows is refused (after a resume's settings check)
    write_json(root / "args.json", asdict(args))
    t0 = time.time()
    ckpt, prev_policy = stage1, None
    for r in range(args.rounds + 1):
        rdir = root / f"round-{r}"
        if r < len(state["rounds"]):  # finished earlier
            rec = state["rounds"][r]
            ckpt, prev_policy = resolve_stored(rec["checkpoint"]), resolve_stored(rec["policy"])
            if rec.get("next_checkpoint"):
                ckpt = resolve_stored(rec["next_checkpoint"])
                prev_policy = ckpt / "policy" if args.joint else prev_policy
                continue
            if rec.get("stop"):
                break
        else:
            caches = caches_for(task, ckpt, args.data_dir)
            print(f"\n== round {r}: policy on {ckpt.name} (memorized layers: "
                  f"{np.bincount(memorized_layer(caches['train'].preds, caches['train'].labels), minlength=caches['train'].num_layers + 1)[1:].tolist()})")
            out = reinforce.train(reinforce.Args(
                env=args.env, reward=args.reward, alpha=args.alpha, epochs=args.policy_epochs, seed=args.seed,
                run_name=f"cotrain-{root.name}-r{r}", out=str(rdir / "policy"),
                init_policy=str(prev_policy) if prev_policy else None, quiet=True), caches)
            dev, calib = out["results"]["dev"], out["results"]["calib"]  # reinforce scored it on these caches
            pol = EvalResult(**dev[out["policy"].name])
            cal = EvalResult(**calib[out["policy"].name])
            rec = {"round": r, "checkpoint": stored_path(ckpt), "policy": stored_path(rdir / "policy"),
                   "calib": cal.to_dict(), "dev": pol.to_dict(),
                   "dev_full_depth": dev[StaticExit(caches["dev"].num_layers).name],
                   "layer_accuracy": {s: layer_accuracy(c) for s, c in caches.items()}}
            print("  " + pol.line() + "   full depth " + f"{100 * rec['dev_full_depth']['metric']:.1f}")
            if state["rounds"]:  # the stop rule reads calib only
                last = state["rounds"][-1]["calib"]
                d_metric = abs(cal.metric - last["metric"])
                d_exit = exit_tv(cal.exit_hist, last["exit_hist"])
                rec["change"] = {"metric": d_metric, "exit_tv": d_exit}
                rec["stop"] = d_metric < args.tol and d_exit < args.tol
            state["rounds"].append(rec)
            write_json(state_file, state)
            prev_policy = rdir / "policy"
            if rec.get("stop"):
                print(f"  converged (change in metric {rec['change']['metric']:.4f}, exits {rec['change']['exit_tv']:.4f})")
                break
        if r == args.rounds:
            break
        print(f"== round {r}: " + ("backbone and policy trained jointly (Eq 6 + Eq 5)" if args.joint
                                   else "backbone Eq 6 with the policy frozen") + f" -> round {r + 1}")
        nxt = backbone_stage(args, task, ckpt, rdir / "policy", rdir / "backbone")
        prev_policy = nxt / "policy" if args.joint else prev_policy
        state["rounds"][r]["next_checkpoint"] = stored_path(nxt)
        write_json(state_file, state)
        ckpt = nxt
    summary = analyse(root, state, stage1, task, args)
    summary["wall_time_s"] = round(time.time() - t0, 1)
    write_json(root / "summary.json", summary)
    print_summary(summary, root)
    return summary


def analyse(root: Path, state: dict, stage1: Path, task: str, args: Args) -> dict:
    """Figure 2 (per-layer accuracy before/after) and Table 1 (hardness correlations)."""
    first, last = state["rounds"][0], state["rounds"][-1]
    fig2 = {"before": first["layer_accuracy"], "after": last["layer_accuracy"],
            "before_checkpoint": first["checkpoint"], "after_checkpoint": last["checkpoint"]}
    tr = get_cache(task=task, split="train", checkpoint=stage1, data_dir=args.data_dir)
    labels = np.asarray(tr.labels)
    mem = memorized_layer(tr.preds, labels)
    loss = -np.asarray(tr.log_probs[np.arange(tr.num_instances), -1, labels], dtype=np.float64)
    forget = None
    hist_file = stage1 / "train_correct.npy"
    if hist_file.is_file():
        hist = np.load(hist_file)[:, :, -1]  # [epochs, N] correctness of the last layer per presentation
        if hist.shape[1] == tr.num_instances:
            forget = forgetting_events(hist.astype(bool))
    table1 = table1_correlation(mem, loss, forget)
    table1["forgetting_presentations"] = int(np.load(hist_file).shape[0]) if hist_file.is_file() else 0
    _plot_fig2(fig2, root / "figure2_layer_accuracy.png", task)
    return {"task": task, "rounds": [{"round": r["round"], "metric": r["dev"]["metric"],
                                      "saved_layers": r["dev"]["saved_layers"], "avg_exit_layer": r["dev"]["avg_exit_layer"],
                                      "full_depth": r["dev_full_depth"]["metric"], "exit_hist": r["dev"]["exit_hist"]}
                                     for r in state["rounds"]],
            "figure2": fig2, "table1": table1}


def _plot_fig2(fig2: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, split in zip(axes, ("train", "dev")):
        for key, style in (("before", "o--"), ("after", "s-")):
            acc = fig2[key][split]
            ax.plot(range(1, len(acc) + 1), [100 * a for a in acc], style,
                    label="Eq 1 (stage 1)" if key == "before" else "ConsistentEE (co-trained)")
        ax.set_title(f"{task} {split}")
        ax.set_xlabel("internal classifier (layer)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy on all instances (%)")
    axes[0].legend()
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def print_summary(s: dict, root: Path) -> None:
    print(f"\n{s['task']} co-training (dev):")
    print("round  metric  full-depth  avg exit  saved")
    for r in s["rounds"]:
        print(f"{r['round']:>5}  {100 * r['metric']:6.1f}  {100 * r['full_depth']:10.1f}  {r['avg_exit_layer']:8.2f}  "
              f"{100 * r['saved_layers']:5.1f}%")
    t = s["table1"]
    print(f"Table 1 (train, stage-1 backbone, n={int(t['n'])}): Spearman(memorized layer, final-layer loss) = {t['rho_loss']:.3f}"
          + (f", Spearman(memorized layer, forgetting events over {t['forgetting_presentations']} epochs) = "
             f"{t['rho_forgetting']:.3f}" if "rho_forgetting" in t else ""))
    print(f"Figure 2: {root / 'figure2_layer_accuracy.png'}\nsummary: {root / 'summary.json'}")


@user_errors
def main(argv: list[str] | None = None) -> dict:
    return run(parse(Args, argv, __doc__))


if __name__ == "__main__":
    main()
