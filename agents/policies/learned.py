"""A learned exit policy pi(exit | observation at layer l) used with a threshold: ConsistentEE's inference rule."""
from __future__ import annotations

import numpy as np
import torch

from agents.policies.base import ExitPolicy
from agents.policies.net import LayerMLPPolicy, policy_inputs
from cee_env.cache import LayerCache
from cee_env.observations import uses_states


class LearnedExit(ExitPolicy):
    """A learned pi(exit | s_l) with the paper's inference rule: exit at the first layer where pi > threshold."""

    def __init__(self, net: LayerMLPPolicy, threshold: float = 0.5, name: str = "consistentee") -> None:
        self.net, self.threshold, self.name = net, threshold, name
        self.needs_states = uses_states(net.features)

    @torch.no_grad()
    def exit_probs(self, states: np.ndarray | None, log_probs: np.ndarray) -> np.ndarray:
        """pi(exit | observation at l) for states [N, L, H] and log-probs [N, L, C] -> [N, L]."""
        x = policy_inputs(None if states is None else np.asarray(states, dtype=np.float32), np.asarray(log_probs),
                          self.net.features)
        return torch.sigmoid(self.net.all_layer_logits(torch.from_numpy(x))).numpy()

    @torch.no_grad()
    def exit_at_layer(self, l, states, log_probs):
        st = None if states is None else np.asarray(states, dtype=np.float32)
        x = policy_inputs(st, np.asarray(log_probs), self.net.features, self.net.num_layers)[:, l]
        s = torch.from_numpy(np.ascontiguousarray(x))
        layer = torch.full((s.shape[0],), l, dtype=torch.long)
        return torch.sigmoid(self.net.logits(s, layer)).numpy() > self.threshold

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        mask = self.exit_probs(cache.states if self.needs_states else None, cache.log_probs) > self.threshold
        mask[:, -1] = True
        return mask
