"""What an exit decision at layer l may read: the observation modes of the environment.

One function, :func:`observe`, turns the per-layer outputs of layers 1..l (pooled states
and the internal classifiers' log-probabilities) into the observation at every layer.
It is causal (layer l's observation reads only layers 1..l), so the environment (over a
whole cache) and an early-exit model (layer by layer, on the prefix it has computed)
get the same numbers.

| mode               | content at layer l                                                  | size       |
|--------------------|---------------------------------------------------------------------|------------|
| ``state``          | s_l, clipped to [-B, B] (the paper)                                  | H          |
| ``state_layer``    | s_l, one-hot of l                                                    | H + L      |
| ``state_probs``    | s_l, p_l(. given x)                                                  | H + C      |
| ``confidence``     | the confidence features below, one-hot of l, p_l(. given x)          | 6 + L + C  |
| ``state_confidence`` | s_l, then everything ``confidence`` has                            | H + 6 + L + C |

The confidence features (all in [0, 1]) are what the heuristic exit rules read:
max probability (Right-Tool), second-largest probability, entropy / log C (DeeBERT),
whether the prediction equals the previous layer's, the patience count (PABEE's
counter, consecutive agreements, divided by L - 1), and the previous layer's max
probability (0 at layer 1).
"""
from __future__ import annotations

import numpy as np

OBS_MODES = ("state", "state_layer", "state_probs", "confidence", "state_confidence")
N_CONFIDENCE = 6


def obs_size(mode: str, hidden: int, num_layers: int, num_classes: int) -> int:
    """Length of one observation."""
    _check(mode)
    conf = N_CONFIDENCE + num_layers + num_classes
    return {"state": hidden, "state_layer": hidden + num_layers, "state_probs": hidden + num_classes,
            "confidence": conf, "state_confidence": hidden + conf}[mode]


def uses_states(mode: str) -> bool:
    """Does the mode read the pooled state s_l?"""
    _check(mode)
    return mode.startswith("state")


def _check(mode: str) -> None:
    if mode not in OBS_MODES:
        raise ValueError(f"unknown observation mode {mode!r}; expected one of {', '.join(OBS_MODES)}")


def confidence_features(log_probs: np.ndarray, num_layers: int) -> np.ndarray:
    """float32 [N, l, 6 + L + C] from log-probabilities [N, l, C] of layers 1..l (l <= L)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    n, l, c = lp.shape
    p = np.exp(lp)
    top2 = -np.partition(-p, 1, axis=-1)[..., :2] if c > 1 else np.concatenate([p, np.zeros_like(p)], -1)
    ent = -(p * np.where(p > 0, lp, 0.0)).sum(-1) / np.log(max(c, 2))
    pred = lp.argmax(-1)
    agree = np.zeros((n, l))
    agree[:, 1:] = pred[:, 1:] == pred[:, :-1]
    patience = np.zeros((n, l))
    for j in range(1, l):
        patience[:, j] = np.where(agree[:, j] > 0, patience[:, j - 1] + 1, 0)
    prev_max = np.zeros((n, l))
    prev_max[:, 1:] = top2[:, :-1, 0]
    out = np.empty((n, l, N_CONFIDENCE + num_layers + c), dtype=np.float32)
    out[..., 0], out[..., 1] = top2[..., 0], top2[..., 1]
    out[..., 2] = np.clip(ent, 0.0, 1.0)
    out[..., 3] = agree
    out[..., 4] = patience / max(num_layers - 1, 1)
    out[..., 5] = prev_max
    out[..., N_CONFIDENCE:N_CONFIDENCE + num_layers] = np.eye(num_layers, dtype=np.float32)[:l][None]
    out[..., N_CONFIDENCE + num_layers:] = np.clip(p, 0.0, 1.0)
    return out


def observe(states: np.ndarray | None, log_probs: np.ndarray, mode: str, num_layers: int | None = None,
            bound: float = 50.0) -> np.ndarray:
    """float32 [N, l, D]: the observation at each of layers 1..l from states [N, l, H] and log-probs [N, l, C].

    ``num_layers`` is L (defaults to l: pass it when giving a prefix of the layers).
    ``states`` may be None for modes that do not read them.
    """
    _check(mode)
    lp = np.asarray(log_probs)
    n, l, c = lp.shape
    L = num_layers or l
    if l > L:
        raise ValueError(f"{l} layers given, but num_layers is {L}")
    parts = []
    if uses_states(mode):
        if states is None:
            raise ValueError(f"observation mode {mode!r} reads the pooled states; got none")
        parts.append(np.clip(np.asarray(states, dtype=np.float32), -bound, bound))
    if mode == "state_layer":
        parts.append(np.broadcast_to(np.eye(L, dtype=np.float32)[:l][None], (n, l, L)))
    elif mode == "state_probs":
        parts.append(np.clip(np.exp(lp), 0.0, 1.0).astype(np.float32))
    elif mode in ("confidence", "state_confidence"):
        parts.append(confidence_features(lp, L))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1).astype(np.float32, copy=False)


def bounds(mode: str, hidden: int, num_layers: int, num_classes: int, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the observation: [-B, B] on the state, [0, 1] on everything else."""
    d = obs_size(mode, hidden, num_layers, num_classes)
    low, high = np.zeros(d, dtype=np.float32), np.ones(d, dtype=np.float32)
    if uses_states(mode):
        low[:hidden], high[:hidden] = -bound, bound
    return low, high
