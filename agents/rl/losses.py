"""The losses of ConsistentEE's training: Eq 5 (the policy), Eq 6 (the backbone at the policy's exits),
and the paper's joint variant (both from one forward pass)."""
from __future__ import annotations

import torch
from torch import nn

from agents.policies.net import policy_inputs
from cee_env.rewards import exit_reward


def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, alive: torch.Tensor,
                   returns: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's Eq 5. ``logits``/``actions``/``alive`` [T, B*K] over steps (alive: the
    trajectory had not ended before that step), ``returns`` [B*K] with the K copies of an
    instance adjacent; their mean return is the instance's baseline."""
    logp_step = -nn.functional.binary_cross_entropy_with_logits(logits, actions, reduction="none")
    logp_tau = (logp_step * alive).sum(0)
    r = returns.view(-1, k)
    adv = (r - r.mean(1, keepdim=True)).reshape(-1)
    return -(adv * logp_tau).mean()


def _policy_logits(exit_net, states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exit logits [B, L] of the policy on detached live states (and probabilities, if it reads them)."""
    features = getattr(getattr(exit_net, "module", exit_net), "features", "state")
    return exit_net(policy_inputs(states, logits.detach().float().log_softmax(-1), features).to(logits.device))


def exit_layer_loss(logits: torch.Tensor, states: torch.Tensor, labels: torch.Tensor, exit_net) -> torch.Tensor:
    """Eq 6: cross-entropy only at the layer where the frozen policy exits (first pi > 0.5, else the last)."""
    with torch.no_grad():
        go = _policy_logits(exit_net, states, logits) > 0  # pi > 0.5
        go[:, -1] = True
        t = go.int().argmax(1)
    return torch.nn.functional.cross_entropy(logits[torch.arange(len(t), device=t.device), t], labels)


def joint_loss(logits: torch.Tensor, states: torch.Tensor, labels: torch.Tensor, memorized: torch.Tensor,
               exit_net, alpha: float, reward: str, k: int) -> tuple[torch.Tensor, dict]:
    """The paper's joint variant: Eq 6 and Eq 5 from one forward pass, both trained.

    K exit trajectories per instance are sampled from the policy on the live (detached)
    states; the classifiers get cross-entropy at each sampled exit layer (Eq 6, averaged
    over the K samples), the policy gets Eq 5 with the reward of that exit computed from
    the live log p_t(y|x) and the instance's memorized layer (the K samples' mean reward
    is the baseline). The forced exit at the last layer is not a decision: its action
    does not enter log pi(tau).
    """
    B, L, _ = logits.shape
    pl = _policy_logits(exit_net, states, logits).repeat_interleave(k, 0)  # [B*K, L]
    lab = labels.repeat_interleave(k)
    with torch.no_grad():
        act = torch.bernoulli(torch.sigmoid(pl))
        act[:, -1] = 1.0
        t = act.argmax(1)  # first exit, 0-based
        steps = torch.arange(L, device=t.device)
        alive = ((steps[None] <= t[:, None]) & (steps[None] < L - 1)).float()
        logp_y = logits.detach().float().log_softmax(-1).repeat_interleave(k, 0)[torch.arange(B * k), t, lab]
        r = exit_reward(logp_y.cpu().numpy(), t.cpu().numpy() + 1, alpha, reward,
                        memorized.repeat_interleave(k).cpu().numpy(), L)
        r = torch.as_tensor(r, dtype=torch.float32, device=pl.device)
    pol = reinforce_loss(pl.T, act.T, alive.T, r, k)
    ce = torch.nn.functional.cross_entropy(logits.repeat_interleave(k, 0)[torch.arange(B * k), t], lab)
    return ce + pol, {"ce": ce.item(), "policy_loss": pol.item(), "reward": r.mean().item(),
                      "exit_layer": (t + 1).float().mean().item()}
