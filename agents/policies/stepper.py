"""Exit decisions one layer at a time, in numpy: what inference calls after every layer.

:meth:`ExitPolicy.exit_at_layer` is asked with the whole history of layers 1..l, and a learned
policy answers through torch (or SB3's ``predict``): a few hundred microseconds per call, more
than a small encoder layer costs in ONNX Runtime on a short input. A :class:`Stepper` keeps what
the observation needs from earlier layers (previous prediction, patience count, previous max
probability) and runs the policy's network as numpy matrix products on layer l's row only:

    stepper = policy.stepper()          # None: the policy has no fast path; ask exit_at_layer
    stepper.start(batch)
    for l in range(L - 1):
        exits = stepper.decide(l, pooled_l, log_probs_l)   # bool [B]
        stepper.keep(np.flatnonzero(~exits))               # rows that go on

Its observation at layer l is :func:`cee_env.observations.observe`'s row l, number for number
(the same float64 arithmetic); the network is the same float32 weights, so its scores equal
torch's up to float32 summation order (~1e-7): a decision differs only for a score within
that of the threshold. ``tests/test_stepper.py`` checks every policy kind against
:meth:`ExitPolicy.exit_mask`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from cee_env.observations import N_CONFIDENCE, uses_states

__all__ = ["Stepper", "MLP", "mlp_from_sequential", "DecisionSpec"]

_SQRT1_2 = np.float32(np.sqrt(0.5))


def _gelu(x: np.ndarray) -> np.ndarray:
    return (x * np.float32(0.5) * (np.float32(1.0) + erf(x * _SQRT1_2))).astype(np.float32, copy=False)


def _clip(x: np.ndarray, lo, hi) -> np.ndarray:
    """np.clip's values (NaN stays NaN), a few microseconds cheaper on the small arrays of one layer."""
    return np.minimum(np.maximum(x, lo), hi)


ACTIVATIONS = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, np.float32(0.0)), "gelu": _gelu,
               "identity": lambda x: x}


class MLP:
    """A stack of (weight [in, out] float32, bias [out] float32, activation name) applied in order."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray, str]]) -> None:
        self.layers = [(np.ascontiguousarray(w, dtype=np.float32), np.asarray(b, dtype=np.float32), ACTIVATIONS[a])
                       for w, b, a in layers]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for w, b, act in self.layers:
            x = act(x @ w + b)
        return x


def mlp_from_sequential(modules) -> list[tuple[np.ndarray, np.ndarray, str]] | None:
    """torch modules (Linear / Tanh / ReLU / GELU / Flatten / Identity, nested Sequentials) as MLP layers; None
    when a module is anything else (the caller then keeps the policy's own torch path)."""
    from torch import nn

    out: list[list] = []

    def walk(m) -> bool:
        if isinstance(m, nn.Sequential):
            return all(walk(c) for c in m)
        if type(m).__name__ == "FlattenExtractor":  # SB3's default features extractor: nn.Flatten only
            return all(walk(c) for c in m.children())
        if isinstance(m, nn.Linear):
            w = m.weight.detach().float().cpu().numpy().T
            b = (m.bias.detach().float().cpu().numpy() if m.bias is not None else np.zeros(w.shape[1], np.float32))
            out.append([w, b, "identity"])
            return True
        act = {nn.Tanh: "tanh", nn.ReLU: "relu"}.get(type(m))
        if act is None and isinstance(m, nn.GELU) and m.approximate == "none":
            act = "gelu"
        if act is not None:
            if not out or out[-1][2] != "identity":
                return False  # an activation not right after a linear layer
            out[-1][2] = act
            return True
        return isinstance(m, (nn.Flatten, nn.Identity))

    ok = all(walk(m) for m in (modules if isinstance(modules, (list, tuple)) else [modules]))
    return [tuple(l) for l in out] if ok and out else None


@dataclass
class DecisionSpec:
    """What ``decide_obs`` computes at one layer, as data (what an exported graph of the decision is built from):
    ``x = (obs - shift) / scale`` (each optional), clipped to +-``clip`` (optional), through ``layers`` (an
    :class:`MLP`'s list), then ``head``:

    - ``"sigmoid"``: one output z; exit iff sigmoid(z) > threshold
    - ``"argmax"``: exit iff the arg max of the outputs (first on ties) is ``exit_index``
    - ``"softmax"``: exit iff softmax(outputs)[exit_index] > threshold
    - ``"qdiff"``: exit iff sigmoid(out[exit_index] - out[1 - exit_index]) > threshold
    """

    layers: list
    head: str
    threshold: float | None = None
    shift: np.ndarray | None = None
    scale: np.ndarray | None = None
    clip: float | None = None
    exit_index: int = 1


class Stepper:
    """Incremental observation (``mode`` of :mod:`cee_env.observations`, states clipped to ``bound``) and a
    decision function ``decide_obs(l, obs [B, D] float32) -> bool [B]``; ``spec(l)`` (optional) is the same
    decision as a :class:`DecisionSpec` (None: it cannot be described as one)."""

    def __init__(self, mode: str, num_layers: int, decide_obs, bound: float = 50.0, spec=None) -> None:
        self.mode, self.L, self.bound, self.decide_obs = mode, int(num_layers), float(bound), decide_obs
        self.spec = spec
        self.states = uses_states(mode)
        self.needs_states = self.states
        self.start(0)

    def start(self, batch: int) -> None:
        self.prev_pred = np.full(batch, -1, dtype=np.int64)
        self.patience = np.zeros(batch)
        self.prev_max = np.zeros(batch)

    def keep(self, idx: np.ndarray) -> None:
        self.prev_pred, self.patience, self.prev_max = self.prev_pred[idx], self.patience[idx], self.prev_max[idx]

    def observe(self, l: int, pooled: np.ndarray | None, log_probs: np.ndarray) -> np.ndarray:
        """Layer l's observation [B, D] (and the carried features move on to layer l)."""
        mode, L = self.mode, self.L
        parts = []
        if self.states:
            b = np.float32(self.bound)
            parts.append(_clip(np.asarray(pooled, dtype=np.float32), -b, b))
        if mode == "state_layer":
            parts.append(np.broadcast_to(np.eye(L, dtype=np.float32)[l], (parts[0].shape[0], L)))
        elif mode == "state_probs":
            parts.append(_clip(np.exp(np.asarray(log_probs)), 0.0, 1.0).astype(np.float32))
        elif mode in ("confidence", "state_confidence"):
            parts.append(self._confidence(l, log_probs))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1).astype(np.float32, copy=False)

    def _confidence(self, l: int, log_probs: np.ndarray) -> np.ndarray:
        lp = np.asarray(log_probs, dtype=np.float64)
        n, c = lp.shape
        p = np.exp(lp)
        top2 = np.sort(p, axis=-1)[:, :-3:-1] if c > 1 else np.concatenate([p, np.zeros_like(p)], -1)
        plp = p * lp
        if not np.isfinite(plp).all():  # p == 0 where lp == -inf: 0 * -inf counts as 0
            plp = p * np.where(p > 0, lp, 0.0)
        ent = -plp.sum(-1) / np.log(max(c, 2))
        pred = lp.argmax(-1)
        agree = (pred == self.prev_pred) if l > 0 else np.zeros(n, dtype=bool)
        patience = np.where(agree, self.patience + 1, 0.0)
        out = np.empty((n, N_CONFIDENCE + self.L + c), dtype=np.float32)
        out[:, 0], out[:, 1] = top2[:, 0], top2[:, 1]
        out[:, 2] = _clip(ent, 0.0, 1.0)
        out[:, 3] = agree
        out[:, 4] = patience / max(self.L - 1, 1)
        out[:, 5] = self.prev_max if l > 0 else 0.0
        out[:, N_CONFIDENCE:N_CONFIDENCE + self.L] = 0.0
        out[:, N_CONFIDENCE + l] = 1.0
        out[:, N_CONFIDENCE + self.L:] = _clip(p, 0.0, 1.0)
        self.prev_pred, self.patience, self.prev_max = pred, patience, top2[:, 0]
        return out

    def decide(self, l: int, pooled: np.ndarray | None, log_probs: np.ndarray) -> np.ndarray:
        """Exit decisions [B] at 0-based layer ``l`` from that layer's pooled states [B, H] (None when the mode
        reads none) and log-probabilities [B, C]; call once per layer, in order, for the rows still in."""
        return np.asarray(self.decide_obs(l, self.observe(l, pooled, log_probs)), dtype=bool)
