"""A learned exit policy pi(exit | observation at layer l) used with a threshold: ConsistentEE's inference rule."""
from __future__ import annotations

import numpy as np
import torch

from agents.policies.base import ExitPolicy
from agents.policies.net import LayerMLPPolicy, policy_inputs
from cee_env.cache import LayerCache


class LearnedExit(ExitPolicy):
    """A learned pi(exit | s_l) with the paper's inference rule: exit at the first layer where pi > threshold."""

    def __init__(self, net: LayerMLPPolicy, threshold: float = 0.5, name: str = "consistentee") -> None:
        self.net, self.threshold, self.name = net, threshold, name

    @torch.no_grad()
    def exit_probs(self, states: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
        """pi(exit | s_l) for states [N, L, H] and log-probs [N, L, C] -> [N, L]."""
        x = policy_inputs(np.asarray(states, dtype=np.float32), np.asarray(log_probs), self.net.features)
        return torch.sigmoid(self.net.all_layer_logits(torch.tensor(x))).numpy()

    @torch.no_grad()
    def exit_at_layer(self, l, states, log_probs):
        x = policy_inputs(np.asarray(states[:, l], dtype=np.float32), np.asarray(log_probs[:, l]), self.net.features)
        s = torch.tensor(x)
        layer = torch.full((s.shape[0],), l, dtype=torch.long)
        return torch.sigmoid(self.net.logits(s, layer)).numpy() > self.threshold

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        mask = self.exit_probs(cache.states, cache.log_probs) > self.threshold
        mask[:, -1] = True
        return mask
