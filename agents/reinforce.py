"""ConsistentEE's policy training (paper Eq 5): REINFORCE on the early-exit environment.

    python -m agents.reinforce --env cee/RTE-v0
    python -m agents.reinforce --env cee/MRPC-v0 --alpha 0.02 --reward vanilla
    python -m agents.reinforce --env cee/MCID-v0 --obs confidence --reward consistency --alpha 0.01
    python -m agents.reinforce --task-file my_task.toml     # your own task (cee/<Name>-v0)

The policy learns on the calib split (training rows the stage-1 backbone never saw,
whose layer outputs look like test-time outputs: ``backbones.protocol``); ``--train-split
train`` learns on the rows the backbone was fitted on, as the paper does.

Per update: a batch of training instances, K trajectories each (K copies of the
instance in the vector env), actions sampled from Bernoulli(pi(exit | s_l)) with
decaying epsilon-random exploration; the loss is
-(1/NK) sum (R_ik - b_i) log pi(tau_ik) with b_i the mean reward of instance i's
K trajectories. The backbone is frozen: the env serves cached layer states.
Evaluation uses the paper's inference rule (exit at the first layer with
pi > 0.5) on dev (and test when given). On a fresh machine the stage-1 checkpoint
and the layer caches are built first.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

import cee_env  # noqa: F401  (registers cee/<Task>-v0)
from agents.runtime import DataArgs, check_inputs, policy_record, run_folders, run_name, torch_threads
from backbones.cli import parse, user_errors
from backbones.files import claim, summary_writer, write_json
from agents.evaluate import EvalResult, evaluate
from agents.policies import LayerMLPPolicy, LearnedExit, OracleExit, StaticExit
from agents.rl.losses import reinforce_loss
from backbones.paths import runs_dir
from cee_env.cache import LayerCache
from cee_env.env import check_env_args


@dataclass
class Args(DataArgs):
    env: str = "cee/RTE-v0"
    """environment id (cee/<Task>-v0)"""
    reward: str = "hardness"
    """hardness (Eq 4), vanilla (Eq 3) or hardness_weighted (the alternative reading of Eq 4)"""
    alpha: float = 0.05
    """depth penalty per layer (t is the 1-based exit layer; the authors use 0.01-0.09 for BERT)"""
    epochs: int = 30
    """passes over the training instances"""
    total_env_steps: int | None = None
    """stop once this many env steps (layer decisions) are taken, mid-epoch if need be; replaces --epochs, and epsilon decays over it"""
    batch_size: int = 32
    """instances per policy update"""
    k: int = 8
    """trajectories per instance (the paper's K); their mean reward is the baseline"""
    lr: float = 3e-4
    """Adam learning rate of the policy"""
    hidden: int = 32
    """hidden units of each layer's policy MLP"""
    shared: bool = False
    """one MLP for all layers with a layer embedding, instead of one per layer"""
    obs: str = "state"
    """what the policy reads (the env's observation mode): state (s_l, the paper), state_layer, state_probs,
    confidence (max prob, entropy, patience, ... with the layer and the class probabilities) or state_confidence"""
    exploration: str = "sample"
    """sample: actions ~ Bernoulli(pi) plus epsilon-random; greedy: pi > 0.5 plus epsilon-random (authors' code)"""
    eps_start: float = 0.2
    """initial epsilon of epsilon-random exploration"""
    eps_end: float = 0.0
    """final epsilon (linear decay over training)"""
    eval_every: int = 5
    """epochs between dev evaluations"""
    seed: int = 0
    """random seed"""
    run_name: str | None = None
    """name of the run folder under runs/reinforce and runs/tb (default: env, reward, alpha, seed, then a short hash
    of the other settings that change the policy when any differs from its default)"""
    out: str | None = None
    """folder for the policy and results.json (default runs/reinforce/<run_name>)"""
    init_policy: str | None = None
    """start from this policy folder instead of a fresh network (co-training warm start)"""
    torch_threads: int = 1
    """torch threads for the policy (its matrices are small: more threads only add overhead)"""
    quiet: bool = False
    """no progress bar or final table"""


def make_caches(args) -> dict[str, LayerCache]:
    """The caches an agent needs: "train" (what the policy learns on: ``args.train_split``), "dev" and,
    with a test file, "test" (both test sets: reported, never learned from). Works for any agent's Args
    with the fields env, train_split, protocol, checkpoint, data_dir, test_file, seed."""
    task = cee_env.env_task(args.env)
    split = getattr(args, "train_split", "calib")
    if split not in ("calib", "calib-a", "calib-b", "train"):
        raise ValueError(f"--train-split must be calib, calib-a, calib-b (a half of calib) or train; got {split!r}")
    if task.lower() == "synthetic":
        from cee_env.synthetic import make_synthetic_cache

        seed = getattr(args, "seed", 0)  # agents.compare runs several seeds on one synthetic task (seed 0's)
        return {"train": make_synthetic_cache(split=split, seed=seed), "dev": make_synthetic_cache(split="dev", seed=seed)}
    from cee_env.cache import deployed_checkpoint, get_cache

    ckpt = args.checkpoint or deployed_checkpoint(task, getattr(args, "protocol", None), args.data_dir,
                                                  getattr(args, "model", None))
    kw = dict(task=task, checkpoint=ckpt, data_dir=args.data_dir)
    out = {"train": get_cache(split=split, **kw), "dev": get_cache(split="dev", **kw)}
    if args.test_file:
        out["test"] = get_cache(split="test", test_file=args.test_file, **kw)
    return out


def register_task_file(args) -> None:
    """``--task-file``: register the file's task and point ``args.env`` at cee/<name>-v0."""
    if getattr(args, "task_file", None):
        from backbones.tasks import load_task_file

        args.env = cee_env.register_task_env(load_task_file(args.task_file).name)


def check_args(args: Args) -> None:
    """Flag values a run cannot use, named (one-line errors at the command line)."""
    from backbones.cli import UserError

    check_env_args(args.reward, args.alpha, args.obs, flag="--")
    if args.exploration not in ("sample", "greedy"):
        raise UserError(f"--exploration must be sample or greedy; got {args.exploration!r}")
    if not (np.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a finite number > 0; got {args.lr}")
    if args.k < 2:
        raise UserError(f"--k must be >= 2 (the baseline is the mean of an instance's K returns; with K=1 every "
                        f"advantage is 0 and nothing is learned); got {args.k}")
    for flag, v in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--hidden", args.hidden),
                    ("--eval-every", args.eval_every), ("--torch-threads", args.torch_threads)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1; got {v}")
    if args.total_env_steps is not None and args.total_env_steps < 1:
        raise UserError(f"--total-env-steps must be >= 1 (or None for --epochs); got {args.total_env_steps}")
    for flag, v in (("--eps-start", args.eps_start), ("--eps-end", args.eps_end)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{flag} must be in [0, 1]; got {v}")


def train(args: Args, caches: dict[str, LayerCache] | None = None) -> dict:
    """Train a policy; returns {"policy": LearnedExit, "results": {...}, "run_dir": Path}.

    Building missing caches (and a missing stage-1 checkpoint) uses every core; only the
    policy's training runs with ``args.torch_threads``.
    """
    check_args(args)
    check_inputs(args)
    register_task_file(args)
    cee_env.env_task(args.env)  # registers cee/<Task>-v0 of a user-defined task
    name = run_name(args, f"{args.env.split('/')[-1]}-{args.reward}-a{args.alpha:g}-s{args.seed}",
                    ("env", "reward", "alpha", "seed"))
    run_dir, tb_dir = run_folders("reinforce", name, args.out)
    caches = caches or make_caches(args)
    with torch_threads(args.torch_threads):
        return _train(args, caches, name, run_dir, tb_dir)


def _train(args: Args, caches: dict[str, LayerCache], name: str, run_dir: Path, tb_dir: Path) -> dict:
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)  # after the caches: building one initialises a model and draws from torch's RNG
    train_cache, dev_cache = caches["train"], caches["dev"]
    n, L = train_cache.num_instances, train_cache.num_layers
    nenv = args.batch_size * args.k
    envs = gym.make_vec(args.env, num_envs=nenv, vectorization_mode="vector_entry_point", task=None,
                        cache=train_cache, split="train", reward=args.reward, alpha=args.alpha, obs=args.obs)
    if args.init_policy:
        net = LayerMLPPolicy.load(args.init_policy).train()
    else:
        net = LayerMLPPolicy(envs.single_observation_space.shape[0], L, args.hidden, args.shared, args.obs)
    net.set_normaliser(envs.unwrapped.tables.obs)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    policy = LearnedExit(net)
    writer = summary_writer(tb_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    updates_per_epoch = int(np.ceil(n / args.batch_size))
    budget = args.total_env_steps
    total = updates_per_epoch * args.epochs
    t0, update, steps, curve = time.time(), 0, 0, []
    bar = tqdm(total=budget or total, desc=f"REINFORCE {name}", disable=args.quiet, unit=" steps" if budget else "it")
    epoch = 0
    while (steps < budget) if budget else (epoch < args.epochs):
        order = rng.permutation(n)
        for b in range(updates_per_epoch):
            if budget and steps >= budget:
                break
            ids = order[b * args.batch_size:(b + 1) * args.batch_size]
            ids = np.concatenate([ids, rng.integers(0, n, args.batch_size - len(ids))])  # fill the last batch
            frac = min(1.0, steps / budget) if budget else update / max(1, total - 1)
            eps = args.eps_start + (args.eps_end - args.eps_start) * frac
            obs, info = envs.reset(options={"indices": np.repeat(ids, args.k)})
            alive = np.ones(nenv, dtype=bool)
            returns = np.zeros(nenv)
            obs_t, layer_t, act_t, alive_t, decide_t = [], [], [], [], []
            while alive.any():
                s = torch.as_tensor(obs)
                layer = torch.as_tensor(info["layer"] - 1)
                with torch.no_grad():
                    p = torch.sigmoid(net.logits(s, layer)).numpy()
                a = (rng.random(nenv) < p) if args.exploration == "sample" else (p > 0.5)
                explore = rng.random(nenv) < eps
                a = np.where(explore, rng.random(nenv) < 0.5, a).astype(np.int64)
                obs_t.append(s), layer_t.append(layer), act_t.append(a), alive_t.append(alive.copy())
                decide_t.append(alive & (info["layer"] < L))  # the exit at layer L is forced: not a decision
                obs, r, term, trunc, info = envs.step(a)
                returns[alive] = r[alive]
                alive &= ~(term | trunc)
            # Recompute log pi(tau) with gradients (Eq 5), over the decisions taken (layers 1..L-1).
            T = len(obs_t)
            logits = net.logits(torch.cat(obs_t), torch.cat(layer_t)).view(T, nenv)
            acts = torch.as_tensor(np.stack(act_t), dtype=torch.float32)
            alv = torch.as_tensor(np.stack(alive_t), dtype=torch.float32)
            decided = torch.as_tensor(np.stack(decide_t), dtype=torch.float32)
            loss = reinforce_loss(logits, acts, decided, torch.as_tensor(returns, dtype=torch.float32), args.k)
            opt.zero_grad()
            loss.backward()
            opt.step()
            update += 1
            n_steps = int(alv.sum())
            steps += n_steps
            with torch.no_grad():
                pr = torch.sigmoid(logits)
                ent = -(pr * torch.log(pr + 1e-8) + (1 - pr) * torch.log(1 - pr + 1e-8))
                ent = float((ent * alv).sum() / alv.sum())
            exit_layer = (alv.sum(0)).numpy()
            writer.add_scalar("charts/mean_reward", returns.mean(), update)
            writer.add_scalar("charts/avg_exit_layer_train", exit_layer.mean(), update)
            writer.add_scalar("charts/policy_entropy", ent, update)
            writer.add_scalar("charts/epsilon", eps, update)
            writer.add_scalar("losses/policy_loss", loss.item(), update)
            curve.append((steps, float(returns.mean())))
            bar.update(n_steps if budget else 1)
            bar.set_postfix(reward=f"{returns.mean():.3f}", exit=f"{exit_layer.mean():.2f}", eps=f"{eps:.2f}")
        epoch += 1
        if epoch % args.eval_every == 0 or (not budget and epoch == args.epochs):
            res = evaluate(policy, dev_cache)
            log_eval(writer, "dev", res, update)
    bar.close()
    envs.close()

    results = {"args": asdict(args), "train_split": train_cache.split, "train_instances": n,
               "train_seconds": round(time.time() - t0, 1), "env_steps": steps, "updates": update,
               "epochs": round(update / updates_per_epoch, 2),
               "reward_curve": curve[:: max(1, len(curve) // 200)]}
    for split, cache in caches.items():
        if split == "train" or not cache.has_labels:
            continue
        rows = [evaluate(p, cache) for p in (StaticExit(L), policy, OracleExit())]
        log_eval(writer, split, rows[1], update)
        results[split] = {r.policy: r.to_dict() for r in rows}
    writer.close()
    with claim(run_dir, f"the run folder {run_dir}"):
        net.save(run_dir, extra=policy_record(train_cache, env=args.env, reward=args.reward, alpha=args.alpha,
                                              obs=args.obs))
        write_json(run_dir / "results.json", results)
    if not args.quiet:
        print_summary(results, run_dir)
    return {"policy": policy, "results": results, "run_dir": run_dir}


def log_eval(writer, split: str, res: EvalResult, step: int) -> None:
    writer.add_scalar(f"eval/{split}_{res.metric_name}", res.metric, step)
    writer.add_scalar(f"eval/{split}_avg_exit_layer", res.avg_exit_layer, step)
    writer.add_scalar(f"eval/{split}_saved_layers", res.saved_layers, step)
    writer.add_histogram(f"eval/{split}_exit_layer", res.exit_layers, step, bins=np.arange(0.5, res.num_layers + 1))


def print_summary(results: dict, run_dir: Path) -> None:
    learned = (f" on {results['train_split']} ({results['train_instances']:,} instances)"
               if "train_split" in results else "")
    print(f"\ntrained{learned} in {results['train_seconds']:.0f} s ({results['env_steps']:,} env steps)")
    for split in ("dev", "test"):
        if split not in results:
            continue
        print(f"\n{split} (a test set: not used for training or choosing):")
        for r in results[split].values():
            print("  " + EvalResult(**{**r, "exit_layers": None, "preds": None}).line()
                  + "   exits per layer " + " ".join(map(str, r["exit_hist"])))
    print(f"\npolicy and results.json: {run_dir}\nTensorBoard: tensorboard --logdir {runs_dir() / 'tb'}")


def parse_args(argv=None) -> Args:
    return parse(Args, argv, __doc__)


@user_errors
def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
