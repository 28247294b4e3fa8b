"""Terminal rewards for an instance that exits at layer t (1-based, unnormalised).

- ``"vanilla"``            Eq 3: R = log p_t(y|x) - alpha * t
- ``"hardness"`` (default) Eq 4: R = log p_t(y|x) - alpha * t * (1 - m/L)
- ``"hardness_weighted"``  the alternative reading of Eq 4 (no support in the authors'
  code, offered as an option): R = (m/L) log p_t(y|x) - (1 - m/L) * alpha * t

m is the instance's memorized layer (Eq 7, 1..L). Continue steps earn 0.
"""
from __future__ import annotations

import numpy as np

REWARDS = ("hardness", "vanilla", "hardness_weighted")


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
    if kind == "vanilla":
        return logp - depth
    if memorized is None or num_layers is None:
        raise ValueError(f"reward {kind!r} needs memorized layers and num_layers")
    frac = np.asarray(memorized, dtype=np.float64) / float(num_layers)
    if kind == "hardness":
        return logp - depth * (1.0 - frac)
    return frac * logp - (1.0 - frac) * depth
