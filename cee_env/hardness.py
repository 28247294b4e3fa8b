"""Instance hardness from a multi-exit model's per-layer predictions.

- :func:`memorized_layer`  Eq 7: the earliest layer from which every later internal
  classifier is right (1-based; L when the last layer is wrong).
- :func:`oracle_exit`      the first layer whose classifier is right (1-based; L if none is).
- :func:`forgetting_events` Toneva et al.'s count of correct -> incorrect transitions.
- :func:`table1_correlation` the paper's Table 1: Spearman of memorized layer with loss
  and with forgetting events.

All functions are vectorised numpy; ``preds`` is int [N, L], ``labels`` int [N]
(-1, "no label", never counts as correct).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def _correct(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.ndim != 2 or labels.shape != (preds.shape[0],):
        raise ValueError(f"expected preds [N, L] and labels [N]; got {preds.shape} and {labels.shape}")
    return preds == labels[:, None]


def memorized_layer(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Eq 7: m_i = min{l : layers l..L all predict y_i}, 1-based; L if layer L is wrong. int64 [N]."""
    correct = _correct(preds, labels)
    num_layers = correct.shape[1]
    # Reversed running AND: entry l is True iff the last l+1 layers are all correct, so
    # the row sum is the length of the all-correct tail.
    tail = np.logical_and.accumulate(correct[:, ::-1], axis=1).sum(axis=1)
    return np.where(tail > 0, num_layers - tail + 1, num_layers).astype(np.int64)


def oracle_exit(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The first correct layer, 1-based; L when no layer is correct. int64 [N]."""
    correct = _correct(preds, labels)
    first = correct.argmax(axis=1) + 1
    return np.where(correct.any(axis=1), first, correct.shape[1]).astype(np.int64)


def forgetting_events(correct_history: np.ndarray) -> np.ndarray:
    """Count correct -> incorrect transitions over E checkpoints/epochs. ``correct_history`` bool [E, N] -> int64 [N]."""
    h = np.asarray(correct_history, dtype=bool)
    if h.ndim != 2:
        raise ValueError(f"expected correct_history [E, N]; got shape {h.shape}")
    return (h[:-1] & ~h[1:]).sum(axis=0).astype(np.int64)


def table1_correlation(
    memorized: np.ndarray, final_layer_loss: np.ndarray, forgetting: np.ndarray | None = None
) -> dict[str, float]:
    """Spearman correlation of the memorized layer with the final layer's loss (and forgetting events).

    Returns ``{"n", "rho_loss", "p_loss"}`` plus ``"rho_forgetting", "p_forgetting"`` when
    ``forgetting`` is given. Constant inputs give NaN (scipy's convention).
    """
    m = np.asarray(memorized, dtype=np.float64)
    loss = np.asarray(final_layer_loss, dtype=np.float64)
    if loss.shape != m.shape:
        raise ValueError(f"memorized {m.shape} and final_layer_loss {loss.shape} differ in shape")
    res = spearmanr(m, loss)
    out = {"n": float(m.size), "rho_loss": float(res.statistic), "p_loss": float(res.pvalue)}
    if forgetting is not None:
        f = np.asarray(forgetting, dtype=np.float64)
        if f.shape != m.shape:
            raise ValueError(f"memorized {m.shape} and forgetting {f.shape} differ in shape")
        res = spearmanr(m, f)
        out.update(rho_forgetting=float(res.statistic), p_forgetting=float(res.pvalue))
    return out


def memorized_histogram(memorized: np.ndarray, num_layers: int) -> np.ndarray:
    """Counts of instances per memorized layer: int64 [L], entry l-1 counts m_i == l."""
    m = np.asarray(memorized, dtype=np.int64)
    if m.size and (m.min() < 1 or m.max() > num_layers):
        raise ValueError(f"memorized layers must lie in 1..{num_layers}; got {m.min()}..{m.max()}")
    return np.bincount(m - 1, minlength=num_layers).astype(np.int64)
