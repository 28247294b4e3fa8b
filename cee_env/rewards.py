"""Terminal rewards for an instance that exits at layer t (1-based, unnormalised).

- ``"vanilla"``            Eq 3: R = log p_t(y|x) - alpha * t
- ``"hardness"`` (default) Eq 4: R = log p_t(y|x) - alpha * t * (1 - m/L)
- ``"hardness_weighted"``  the alternative reading of Eq 4 (no support in the authors'
  code, offered as an option): R = (m/L) log p_t(y|x) - (1 - m/L) * alpha * t

Extensions (not in the paper), rewards of the exit decision itself rather than of the
gold label's probability:

- ``"accuracy"``     R = 1[prediction at t is right] - alpha * t
- ``"consistency"``  R = 1[prediction at t equals the full-depth prediction] - alpha * t
  (needs no labels: the risk an early exit adds is disagreeing with the full model)

For these two the first argument of :func:`exit_reward` is the 0/1 indicator instead of
log p_t(y|x) (:func:`exit_quality` picks the right one).

m is the instance's memorized layer (Eq 7, 1..L). Continue steps earn 0.
"""
from __future__ import annotations

import numpy as np

REWARDS = ("hardness", "vanilla", "hardness_weighted", "accuracy", "consistency")


def exit_reward(
    log_p_true: np.ndarray | float,
    t: np.ndarray | int,
    alpha: float,
    kind: str = "hardness",
    memorized: np.ndarray | int | None = None,
    num_layers: int | None = None,
) -> np.ndarray:
    """Vectorised terminal reward; arguments broadcast, result is float64."""
    if kind not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}; expected one of {REWARDS}")
    logp = np.asarray(log_p_true, dtype=np.float64)
    depth = alpha * np.asarray(t, dtype=np.float64)
    if kind in ("vanilla", "accuracy", "consistency"):
        return logp - depth
    if memorized is None or num_layers is None:
        raise ValueError(f"reward {kind!r} needs memorized layers and num_layers")
    frac = np.asarray(memorized, dtype=np.float64) / float(num_layers)
    if kind == "hardness":
        return logp - depth * (1.0 - frac)
    return frac * logp - (1.0 - frac) * depth


def exit_quality(kind: str, log_p_true: np.ndarray, preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The first term of the reward for every instance and layer [N, L]: log p_t(y|x) for the paper's
    rewards, 1[pred_t == y] for "accuracy", 1[pred_t == pred_L] for "consistency"."""
    if kind not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}; expected one of {REWARDS}")
    if kind == "accuracy":
        return (preds == np.asarray(labels)[:, None]).astype(np.float64)
    if kind == "consistency":
        return (preds == preds[:, -1:]).astype(np.float64)
    return np.asarray(log_p_true, dtype=np.float64)
