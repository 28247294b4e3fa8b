"""Per-instance, per-layer outputs of a frozen multi-exit backbone, cached on disk.

A :class:`LayerCache` holds, for N instances and L layers:

- ``states``    float32 [N, L, H]: s_l, the pooled state the internal classifier at l reads
- ``log_probs`` float32 [N, L, C]: log p_l(. | x)
- ``labels``    int64   [N]: gold labels (-1 where the split has none)

Predictions, the memorized layer (Eq 7) and the oracle exit are derived from
these. No transformer runs when an environment reads a cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerCache:
    states: np.ndarray
    log_probs: np.ndarray
    labels: np.ndarray
    task: str = ""
    split: str = ""
    label_names: tuple[str, ...] = ()
    metric: str = "accuracy"
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.states.ndim != 3 or self.log_probs.ndim != 3 or self.labels.ndim != 1:
            raise ValueError(
                "LayerCache expects states [N,L,H], log_probs [N,L,C], labels [N]; got "
                f"{self.states.shape}, {self.log_probs.shape}, {self.labels.shape}"
            )
        n, l, _ = self.states.shape
        if self.log_probs.shape[:2] != (n, l) or self.labels.shape[0] != n:
            raise ValueError(
                f"LayerCache shapes disagree: states {self.states.shape}, "
                f"log_probs {self.log_probs.shape}, labels {self.labels.shape}"
            )

    @property
    def num_instances(self) -> int:
        return self.states.shape[0]

    @property
    def num_layers(self) -> int:
        return self.states.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]

    @property
    def num_classes(self) -> int:
        return self.log_probs.shape[2]

    @property
    def preds(self) -> np.ndarray:
        """int64 [N, L]: argmax prediction of every internal classifier."""
        return self.log_probs.argmax(-1)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all())
