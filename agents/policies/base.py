"""Exit policies: anything that decides, layer by layer, whether an instance exits.

Every policy answers one causal question, :meth:`ExitPolicy.exit_at_layer`: given
what layers 1..l have produced for a batch (pooled states and log-probabilities),
does each instance exit at l? The evaluator asks it over a cached split, the
early-exit model asks it while the transformer runs; both get the same answers.
The last layer always exits.
"""
from __future__ import annotations

import numpy as np

from cee_env.cache import LayerCache

__all__ = ["ExitPolicy", "StaticExit", "OracleExit"]


class ExitPolicy:
    """Base class. Subclasses implement :meth:`exit_at_layer` (or override :meth:`exit_mask`)."""

    name = "policy"
    needs_states = True  # False for rules that read only the classifiers' outputs

    def exit_at_layer(self, l: int, states: np.ndarray | None, log_probs: np.ndarray) -> np.ndarray:
        """Exit decisions at 0-based layer ``l`` for a batch.

        ``states`` [B, l+1, H] (None when ``needs_states`` is False) and ``log_probs``
        [B, l+1, C] hold layers 1..l+1 of the batch. Returns bool [B].
        """
        raise NotImplementedError

    def stepper(self):
        """A :class:`~agents.policies.stepper.Stepper` making the same decisions layer by layer from that layer's
        outputs alone (what inference uses when there is one), or None: inference asks :meth:`exit_at_layer`."""
        return None

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        """bool [N, L]: would instance n exit at layer l if it got there? (last column all True)"""
        n, L = cache.num_instances, cache.num_layers
        mask = np.ones((n, L), dtype=bool)
        for l in range(L - 1):
            st = cache.states[:, : l + 1] if self.needs_states else None
            mask[:, l] = self.exit_at_layer(l, st, cache.log_probs[:, : l + 1])
        return mask


class StaticExit(ExitPolicy):
    """Every instance exits at layer ``k`` (1-based); ``k = L`` is the full-depth model."""

    needs_states = False

    def __init__(self, k: int) -> None:
        self.k = k
        self.name = f"static-{k}"

    def exit_at_layer(self, l, states, log_probs):
        return np.full(log_probs.shape[0], l + 1 >= self.k)


class OracleExit(ExitPolicy):
    """The ceiling: exit at the first layer whose prediction is correct (needs labels)."""

    name = "oracle"
    needs_states = False

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        mask = cache.preds == cache.labels[:, None]
        mask[:, -1] = True
        return mask
