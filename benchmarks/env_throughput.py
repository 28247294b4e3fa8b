"""Environment throughput: steps per second of the early-exit env, single and vectorised.

Measures, with uniformly random pre-generated actions (so action sampling is not timed):

- ``single_raw``:  ``EarlyExitEnv`` called directly (step, and reset when an episode ends)
- ``single_make``: ``gymnasium.make("cee/...-v0")`` with its default wrappers
  (PassiveEnvChecker, OrderEnforcing)
- ``vector_N``:    ``EarlyExitVectorEnv`` with N sub-envs (env-steps/s = N * calls/s)

Default cache: synthetic of realistic size (N=2490 instances as RTE train, L=6, H=384,
C=2, as MiniLM-L6). ``--task RTE`` uses the real cache through ``cee_env.cache.get_cache``.
Targets on a 2-core machine: >= 300k steps/s single raw, >= 2M env-steps/s at N=4096.

    python -m benchmarks.env_throughput [--task RTE] [--obs state] [--out PATH]
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gymnasium as gym
import numpy as np

from backbones.cli import parse, user_errors
from backbones.files import write_json
from cee_env import OBS_MODES, EarlyExitEnv, EarlyExitVectorEnv, make_synthetic_cache

TARGETS = {"single_raw": 300_000, "vector_4096": 2_000_000}


def bench_single(env: gym.Env, steps: int, seed: int) -> float:
    actions = np.random.default_rng(seed).integers(0, 2, size=steps).tolist()
    env.reset(seed=seed)
    step, reset = env.step, env.reset
    t0 = time.perf_counter()
    for a in actions:
        if step(a)[2]:
            reset()
    return steps / (time.perf_counter() - t0)


def bench_vector(env: EarlyExitVectorEnv, calls: int, seed: int) -> float:
    actions = np.random.default_rng(seed).integers(0, 2, size=(calls + 5, env.num_envs))
    env.reset(seed=seed)
    for a in actions[:5]:  # warm-up
        env.step(a)
    t0 = time.perf_counter()
    for a in actions[5:]:
        env.step(a)
    return calls * env.num_envs / (time.perf_counter() - t0)


@dataclass
class Args:
    """Settings of ``python -m benchmarks.env_throughput``; every field is a flag."""

    task: str | None = None
    """real task cache via get_cache (e.g. RTE); None: synthetic"""
    split: str = "train"
    """split of the real cache"""
    checkpoint: str | None = None
    """checkpoint for get_cache; None: its own default"""
    n: int = 2490
    """synthetic: instances (RTE train size)"""
    layers: int = 6
    """synthetic: layers L"""
    hidden: int = 384
    """synthetic: state size H"""
    classes: int = 2
    """synthetic: classes C"""
    obs: Literal[OBS_MODES] = "state"  # type: ignore[valid-type]  (the env's observation modes)
    """observation mode"""
    steps: int = 500_000
    """single-env steps to time"""
    vector_calls: int = 200
    """vector step() calls to time"""
    num_envs: tuple[int, ...] = (256, 4096)
    """vector sizes"""
    repeats: int = 3
    """take the best of this many runs"""
    seed: int = 0
    """seed for actions and env"""
    out: str | None = None
    """JSON path; None: runs/benchmarks/env_throughput.json"""


@user_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse(Args, argv, __doc__)

    if args.task:
        from cee_env.cache import get_cache

        cache = get_cache(task=args.task, split=args.split, checkpoint=args.checkpoint, data_dir=None, test_file=None)
        env_id, make_kwargs = f"cee/{args.task}-v0", {"split": args.split, "checkpoint": args.checkpoint}
    else:
        kw = dict(n=args.n, num_layers=args.layers, hidden=args.hidden, num_classes=args.classes, seed=args.seed)
        cache = make_synthetic_cache(**kw)
        env_id, make_kwargs = "cee/Synthetic-v0", {"cache_kwargs": kw}
    env_kw = {"obs": args.obs}
    best = lambda f: max(f() for _ in range(args.repeats))  # noqa: E731

    results: dict[str, float] = {}
    raw = EarlyExitEnv(cache=cache, **env_kw)
    results["single_raw"] = best(lambda: bench_single(raw, args.steps, args.seed))
    made = gym.make(env_id, **make_kwargs, **env_kw)
    results["single_make"] = best(lambda: bench_single(made, args.steps, args.seed))
    for n in args.num_envs:
        venv = EarlyExitVectorEnv(n, cache=cache, **env_kw)
        results[f"vector_{n}"] = best(lambda: bench_vector(venv, args.vector_calls, args.seed))

    n_inst, L, H = cache.states.shape
    print(f"cache: {cache.task or 'synthetic'}/{cache.split} N={n_inst} L={L} H={H} C={cache.num_classes} obs={args.obs}")
    print(f"{'setting':<14}{'steps/s':>14}{'target':>12}  ok")
    for k, v in results.items():
        tgt = TARGETS.get(k)
        print(f"{k:<14}{v:>14,.0f}{(f'{tgt:,}' if tgt else '-'):>12}  {'' if tgt is None else ('yes' if v >= tgt else 'NO')}")

    report = {
        "steps_per_s": results, "targets": TARGETS,
        "cache": {"task": cache.task, "split": cache.split, "N": n_inst, "L": L, "H": H, "C": cache.num_classes},
        "obs": args.obs, "steps": args.steps, "vector_calls": args.vector_calls, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "gymnasium": gym.__version__, "platform": platform.platform()},
    }
    if args.out:
        out = Path(args.out)
    else:
        from backbones.paths import runs_dir

        out = runs_dir() / "benchmarks" / "env_throughput.json"
    write_json(out, report, indent=2)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
