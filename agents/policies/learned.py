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

    def stepper(self):
        """Layer-by-layer decisions in numpy (:mod:`agents.policies.stepper`), equal to :meth:`exit_at_layer`'s."""
        from agents.policies.stepper import _gelu, DecisionSpec, Stepper

        net = self.net
        mean, std = net.mean.detach().cpu().numpy(), net.std.detach().cpu().numpy()
        w1, b1 = net.w1.detach().cpu().numpy(), net.b1.detach().cpu().numpy()
        w2, b2 = net.w2.detach().cpu().numpy()[..., 0], net.b2.detach().cpu().numpy()[..., 0]
        emb = None if net.layer_emb is None else net.layer_emb.detach().cpu().numpy()
        thr = self.threshold

        def decide(l: int, obs: np.ndarray) -> np.ndarray:
            g = 0 if net.shared else l
            h = ((obs - mean) / std) @ w1[g] + b1[g]
            if emb is not None:
                h = h + emb[l]
            z = _gelu(h) @ w2[g] + b2[g]
            return np.float32(1.0) / (np.float32(1.0) + np.exp(-z)) > thr

        def spec(l: int) -> DecisionSpec:
            g = 0 if net.shared else l
            bias = b1[g] if emb is None else b1[g] + emb[l]
            return DecisionSpec([(w1[g], bias, "gelu"), (w2[g][:, None], b2[g:g + 1], "identity")], "sigmoid", thr,
                                shift=mean, scale=std)

        return Stepper(net.features, net.num_layers, decide, spec=spec)

    def exit_mask(self, cache: LayerCache) -> np.ndarray:
        mask = self.exit_probs(cache.states if self.needs_states else None, cache.log_probs) > self.threshold
        mask[:, -1] = True
        return mask
