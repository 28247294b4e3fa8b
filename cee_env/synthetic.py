"""A synthetic :class:`LayerCache` whose right exit layer is known, for tests and benchmarks.

Each instance i has a hidden difficulty d_i in 1..L (uniform). The classifier at
layer l is wrong for l < d_i (the true class gets probability 0.02-0.3) and right
for l >= d_i with one per-instance confidence c_i in [0.85, 0.99] at every such
layer. Hence the memorized layer (Eq 7) and the first correct layer are both d_i,
and under Eq 3 and Eq 4 (alpha > 0) the reward-maximising exit is exactly d_i:
deeper layers add no log-probability but cost depth.

The state s_l (H >= 2L+1 floats) is Gaussian noise (std ``noise``) plus a signal of
size 1 in three places: a one-hot of d_i (dims 0..L-1), a one-hot of the layer l
(dims L..2L-1) and a "ready" flag, +1 if l >= d_i else -1 (dim 2L). A linear policy
on dim 2L already exits at d_i. ``cache.meta["difficulty"]`` holds d (int64 [N]).
"""
from __future__ import annotations

import zlib

import numpy as np

from cee_env.cache import LayerCache


def make_synthetic_cache(
    n: int = 512,
    num_layers: int = 6,
    hidden: int = 16,
    num_classes: int = 2,
    seed: int = 0,
    split: str = "train",
    noise: float = 0.1,
) -> LayerCache:
    """Build the synthetic cache; different ``split`` names give independent draws."""
    if hidden < 2 * num_layers + 1:
        raise ValueError(f"hidden must be >= 2*num_layers+1 = {2 * num_layers + 1}; got {hidden}")
    if num_classes < 2 or n < 1 or num_layers < 1:
        raise ValueError(f"need n >= 1, num_layers >= 1, num_classes >= 2; got {n}, {num_layers}, {num_classes}")
    L, C = num_layers, num_classes
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    d = rng.integers(1, L + 1, size=n)
    labels = rng.integers(0, C, size=n)
    layer = np.arange(1, L + 1)
    ready = layer[None, :] >= d[:, None]  # [N, L]

    # Probabilities: ready layers give the label c_i and share 1-c_i; others give the
    # label u in [0.02, 0.3] and a fixed wrong class w the lion's share.
    conf = rng.uniform(0.85, 0.99, size=(n, 1))
    u = rng.uniform(0.02, 0.3, size=(n, L))
    p_true = np.where(ready, conf, u)
    wrong = (labels + rng.integers(1, C, size=n)) % C
    p_wrong = np.where(ready, (1 - p_true) / (C - 1), 1 - p_true if C == 2 else 0.6)
    p_rest = (1 - p_true - p_wrong) / max(C - 2, 1)
    probs = np.broadcast_to(p_rest[..., None], (n, L, C)).copy()
    rows = np.arange(n)[:, None]
    probs[rows, layer[None, :] - 1, wrong[:, None]] = p_wrong
    probs[rows, layer[None, :] - 1, labels[:, None]] = p_true
    log_probs = np.log(np.clip(probs, 1e-12, 1.0)).astype(np.float32)

    states = (noise * rng.standard_normal((n, L, hidden))).astype(np.float32)
    states[rows, layer[None, :] - 1, d[:, None] - 1] += 1.0
    states[:, np.arange(L), L + np.arange(L)] += 1.0
    states[:, :, 2 * L] += np.where(ready, 1.0, -1.0).astype(np.float32)

    return LayerCache(
        states=states,
        log_probs=log_probs,
        labels=labels.astype(np.int64),
        task="Synthetic",
        split=split,
        label_names=tuple(f"class{k}" for k in range(C)),
        fingerprint=f"synthetic-n{n}-L{L}-H{hidden}-C{C}-s{seed}-{split}-noise{noise}",
        meta={"difficulty": d.astype(np.int64)},
    )
