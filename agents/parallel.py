"""Independent fits, one after another or on Ray workers (the optional extra ``ray``), with the same results.

    results = fit_map(fit_one, jobs, names, shared=caches, workers=cfg.workers, address=cfg.ray_address)

``fit_map`` calls ``fn(*job, shared)`` for every job and returns the results in the order of
``jobs``. With ``workers=0`` and no ``address`` it is a plain loop and Ray is never imported.
Otherwise every job is a Ray task (one CPU each): ``shared`` (the layer caches) goes to
Ray's object store once and every task reads it from there (zero-copy on a node; copied
once to each other node); results come back in job order, so a table never depends on the
number of workers or on which fit finished first, and a fit's seed is part of its job. A
task whose worker process dies is retried (``max_retries``); a fit that raises is not
retried (it would raise again) and every failed fit is named in one :class:`FitFailed`
after the others have finished: no result goes silently missing. Workers are started with
this process's ``CEE_RUNS_DIR``, ``CEE_DATA_DIR`` and the folder the ``agents`` package is
imported from, so they write runs to the same place (on a cluster: the same path on shared
storage) and run the same code.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

INSTALL = "pip install 'consistentee-gym[ray]' (or: pip install 'ray>=2.9')"


class FitFailed(RuntimeError):
    """Some fits of a parallel map failed; the message names each and its error."""


def fit_map(fn: Callable[..., Any], jobs: Sequence[tuple], names: Sequence[str], shared: Any = None,
            workers: int = 0, address: str | None = None, desc: str | None = None, max_retries: int = 2) -> list:
    """``[fn(*job, shared) for job in jobs]``, serially (``workers=0``, no ``address``) or as Ray tasks on
    ``workers`` local CPUs or the Ray cluster at ``address``. ``desc``: a progress bar over the fits."""
    if len(names) != len(jobs):
        raise ValueError(f"fit_map: {len(jobs)} jobs but {len(names)} names")
    if not workers and not address:
        return [fn(*job, shared) for job in tqdm(jobs, desc=desc, disable=desc is None, leave=False)]
    ray = start_ray(workers, address)
    task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(fn)
    ref = ray.put(shared)
    pending = {task.options(name=name).remote(*job, ref): i for i, (job, name) in enumerate(zip(jobs, names))}
    results, failed = [None] * len(jobs), []
    with tqdm(total=len(jobs), desc=desc, disable=desc is None, leave=False) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                failed.append(f"{names[i]}: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}")
            bar.update()
    if failed:
        raise FitFailed(f"{len(failed)} of {len(jobs)} fits failed on Ray workers: " + "; ".join(failed))
    return results


def start_ray(workers: int = 0, address: str | None = None):
    """The ``ray`` module, connected: to ``address``, else to a local Ray with ``workers`` CPUs (started once
    per process). Without Ray installed: a :class:`~backbones.cli.UserError` saying how to install it."""
    from backbones.cli import UserError

    try:
        import ray
    except ImportError:
        raise UserError(f"--workers / --ray-address run fits on Ray, which is not installed: {INSTALL}") from None
    if not ray.is_initialized():
        from backbones.paths import runs_dir

        code = str(Path(__file__).resolve().parent.parent)
        env = {"CEE_RUNS_DIR": str(runs_dir()),
               "PYTHONPATH": os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p)}
        if os.environ.get("CEE_DATA_DIR"):
            env["CEE_DATA_DIR"] = os.environ["CEE_DATA_DIR"]
        kw = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
        print(f"starting Ray ({f'cluster {address}' if address else f'{workers} local workers'}) ...",
              file=sys.stderr, flush=True)
        ray.init(**kw, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
    return ray


def check_workers(workers: int, address: str | None) -> None:
    """The flags' values: ``--workers`` >= 0; either flag needs Ray (one line naming the install otherwise)."""
    from backbones.cli import UserError

    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0: one fit after another in this process); got {workers}")
    if workers or address:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UserError(f"--workers / --ray-address run fits on Ray, which is not installed: {INSTALL}")
