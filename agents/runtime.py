"""Small helpers shared by the agents' entry points: thinning and averaging curves, thread counts."""
from __future__ import annotations

from contextlib import contextmanager

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
