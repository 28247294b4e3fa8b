"""Fitted Q iteration for the exit decision: early exiting solved as optimal stopping.

    python -m agents.fqi --env cee/RTE-v0 --obs confidence --reward consistency --alpha 0.01

Early exiting is an optimal-stopping problem: at layer l the agent either stops and
collects the exit reward r_l, or continues to the value of the best later decision.
Fitted Q iteration (Ernst et al. 2005), in the backward form used for optimal stopping
(Longstaff & Schwartz 2001), learns it from a batch of episodes:

1. Collect episodes from the environment: every training instance is played L times,
   exiting at layer 1, 2, ..., L, so every (instance, layer) has its observation and
   the reward of exiting there.
2. Backward over the layers, one small network per layer with two outputs fitted by
   least squares: Q_exit(l, o_l) ~ E[r_l | o_l] and Q_cont(l, o_l) ~ E[V_{l+1} | o_l],
   where V_L = r_L and V_l = r_l if Q_exit(l) >= Q_cont(l) else V_{l+1} (the realised
   value of following the learned rule, which avoids the max bias of fitting max(Q)).
3. The policy exits where Q_exit - Q_cont > 0; it is saved as an ordinary policy network
   whose logit is (Q_exit - Q_cont) / tau, so pi > 0.5 is the greedy rule and other
   thresholds on pi trade accuracy for speed like any learned policy's.

Any reward of the environment works (the paper's Eq 3/4 or the 0/1 "accuracy" and
"consistency" extensions); the observation is any env observation mode.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import cee_env  # noqa: F401  (registers cee/<Task>-v0)
from agents.evaluate import evaluate
from agents.policies import LayerMLPPolicy, LearnedExit, OracleExit, StaticExit
from agents.reinforce import log_eval, make_caches, print_summary, register_task_file
from agents.runtime import DataArgs, check_inputs, policy_record, run_folders, run_name, torch_threads
from backbones.cli import parse, user_errors
from backbones.files import summary_writer, write_json
from cee_env.cache import LayerCache
from cee_env.env import check_env_args


@dataclass
class Args(DataArgs):
    env: str = "cee/RTE-v0"
    """environment id (cee/<Task>-v0)"""
    reward: str = "consistency"
    """the env's reward: consistency, accuracy (0/1 extensions), hardness (Eq 4), vanilla (Eq 3), hardness_weighted"""
    alpha: float = 0.01
    """depth penalty per layer"""
    obs: str = "confidence"
    """the env's observation mode (state, state_layer, state_probs, confidence, state_confidence)"""
    hidden: int = 32
    """hidden units of each layer's Q network"""
    epochs: int = 200
    """full-batch Adam steps per layer"""
    lr: float = 1e-2
    """Adam learning rate"""
    weight_decay: float = 1e-3
    """Adam weight decay (the Q networks see a few thousand points per layer)"""
    tau: float = 1.0
    """temperature of the saved policy: pi = sigmoid((Q_exit - Q_cont) / tau)"""
    seed: int = 0
    """random seed"""
    run_name: str | None = None
    """run folder name under runs/fqi (default: env, reward, alpha, obs, seed, then a short hash of the other
    settings that change the policy when any differs from its default)"""
    torch_threads: int = 1
    """torch threads while fitting (the networks are small)"""
    quiet: bool = False
    """no final table"""


def collect_episodes(envs, n: int, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Play every instance L times (exit at layer 1..L) in a vector env of ``k * L`` sub-envs.

    Returns observations [N, L, D] and exit rewards [N, L] (reward of exiting at layer l).
    """
    L, m = num_layers, envs.num_envs // num_layers
    obs_all = np.zeros((n, L, envs.single_observation_space.shape[0]), dtype=np.float32)
    rew_all = np.zeros((n, L))
    for start in range(0, n, m):
        ids = np.arange(start, min(n, start + m))
        pad = np.concatenate([ids, np.full(m - len(ids), ids[-1])])
        idx, target = np.repeat(pad, L), np.tile(np.arange(1, L + 1), m)
        obs, info = envs.reset(options={"indices": idx})
        alive = np.ones(len(idx), dtype=bool)
        while alive.any():
            layer = info["layer"]
            full = alive & (target == L)  # the episode that continues to the end shows every layer
            obs_all[idx[full], layer[full] - 1] = obs[full]
            act = (layer >= target).astype(np.int64)
            obs, r, term, trunc, info = envs.step(act)
            done = alive & (term | trunc)
            rew_all[idx[done], target[done] - 1] = r[done]
            alive &= ~done
    return obs_all, rew_all


class LayerQ(nn.Module):
    """Per layer: standardise, Linear(D, hidden), GELU, Linear(hidden, 2) -> (Q_exit, Q_cont)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, 2)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.l1((x - self.mean) / self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.hidden(x))


def fit_layer(x: np.ndarray, y: np.ndarray, mask: np.ndarray, args: Args) -> LayerQ:
    """Least squares of both heads on one layer's observations; ``mask`` [N, 2] says which targets exist."""
    q = LayerQ(x.shape[1], args.hidden)
    xt = torch.from_numpy(x)
    q.mean.copy_(xt.mean(0))
    q.std.copy_(xt.std(0) + 1e-4)
    yt, mt = torch.as_tensor(y, dtype=torch.float32), torch.as_tensor(mask, dtype=torch.float32)
    opt = torch.optim.Adam(q.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    for _ in range(args.epochs):
        loss = (((q(xt) - yt) ** 2) * mt).sum() / mt.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q.eval()


def fit_q(obs: np.ndarray, rew: np.ndarray, args: Args) -> tuple[list[LayerQ], np.ndarray]:
    """Backward fitted Q iteration; returns the per-layer networks and the fitted values [N, L, 2]."""
    n, L, _ = obs.shape
    nets: list[LayerQ] = [None] * L  # type: ignore[list-item]
    values = np.zeros((n, L, 2))
    v_next = rew[:, -1].copy()  # V_L: the last layer always exits
    for l in range(L - 1, -1, -1):
        y = np.stack([rew[:, l], v_next], 1)
        mask = np.ones((n, 2))
        if l == L - 1:
            mask[:, 1] = 0.0  # no continuing from the last layer
        nets[l] = fit_layer(obs[:, l], y, mask, args)
        with torch.no_grad():
            q = nets[l](torch.from_numpy(obs[:, l])).double().numpy()
        values[:, l] = q
        if l < L - 1:
            v_next = np.where(q[:, 0] >= q[:, 1], rew[:, l], v_next)
    return nets, values


def as_policy(nets: list[LayerQ], features: str, tau: float) -> LayerMLPPolicy:
    """The greedy rule as a policy network: logit_l = (Q_exit - Q_cont) / tau, folded into the output layer."""
    dim, hidden, L = nets[0].l1.in_features, nets[0].l1.out_features, len(nets)
    pol = LayerMLPPolicy(dim, L, hidden, shared=False, features=features)
    with torch.no_grad():
        # The policy standardises once with one (mean, std); fold each layer's own statistics into its W1, b1.
        pol.mean.zero_()
        pol.std.fill_(1.0)
        for l, q in enumerate(nets):
            w = q.l1.weight.T / q.std[:, None]  # [D, hidden]
            pol.w1[l].copy_(w)
            pol.b1[l].copy_(q.l1.bias - q.mean @ w)
            d = (q.l2.weight[0] - q.l2.weight[1]) / tau
            pol.w2[l].copy_(d[:, None])
            pol.b2[l].copy_(((q.l2.bias[0] - q.l2.bias[1]) / tau).reshape(1))
        if L:  # the last layer always exits; its Q_cont head was never fitted
            pol.w2[L - 1].zero_()
            pol.b2[L - 1].fill_(10.0)
    return pol.eval()


def train(args: Args, caches: dict[str, LayerCache] | None = None) -> dict:
    """Fit the exit rule; returns {"policy": LearnedExit, "results": {...}, "run_dir": Path}."""
    check_env_args(args.reward, args.alpha, args.obs, flag="--")
    if not (args.tau > 0 and np.isfinite(args.tau)) or args.epochs < 1 or args.hidden < 1:
        raise ValueError("--tau must be a finite number > 0, --epochs and --hidden >= 1")
    check_inputs(args)
    register_task_file(args)
    cee_env.env_task(args.env)
    name = run_name(args, f"{args.env.split('/')[-1]}-{args.reward}-a{args.alpha:g}-{args.obs}-s{args.seed}",
                    ("env", "reward", "alpha", "obs", "seed"))
    run_dir, tb_dir = run_folders("fqi", name)
    caches = caches or make_caches(args)
    with torch_threads(args.torch_threads):
        torch.manual_seed(args.seed)
        t0 = time.time()
        train_cache = caches["train"]
        n, L = train_cache.num_instances, train_cache.num_layers
        m = max(1, min(n, 4096 // L))
        envs = gym.make_vec(args.env, num_envs=m * L, vectorization_mode="vector_entry_point", task=None,
                            cache=train_cache, split="train", reward=args.reward, alpha=args.alpha, obs=args.obs)
        obs, rew = collect_episodes(envs, n, L)
        envs.close()
        nets, _ = fit_q(obs, rew, args)
        policy = LearnedExit(as_policy(nets, args.obs, args.tau), name="fqi")
        seconds = time.time() - t0
    writer = summary_writer(tb_dir)
    results = {"args": asdict(args), "train_split": train_cache.split, "train_instances": n,
               "train_seconds": round(seconds, 1), "episodes": int(n * L),
               "env_steps": int(n * L * (L + 1) // 2), "mean_exit_reward_by_layer": rew.mean(0).tolist()}
    for split, cache in caches.items():
        if split == "train" or not cache.has_labels:
            continue
        rows = [evaluate(p, cache) for p in (StaticExit(L), policy, OracleExit())]
        log_eval(writer, split, rows[1], 0)
        results[split] = {r.policy: r.to_dict() for r in rows}
    writer.close()
    policy.net.save(run_dir, extra=policy_record(train_cache, env=args.env, reward=args.reward, alpha=args.alpha,
                                                 obs=args.obs, algo="fqi"))
    write_json(run_dir / "results.json", results)
    if not args.quiet:
        print_summary(results, Path(run_dir))
    return {"policy": policy, "results": results, "run_dir": run_dir}


def parse_args(argv=None) -> Args:
    return parse(Args, argv, __doc__)


@user_errors
def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
