"""The exit policy network pi(exit | s_l) of ConsistentEE, trained by the RL agents (Eq 5)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones.files import load_tensors, read_json, save_tensors, stored_path, write_json
from cee_env.observations import OBS_MODES, observe

WEIGHTS = "policy.safetensors"


FEATURES = OBS_MODES


def policy_inputs(states, log_probs, features: str, num_layers: int | None = None):
    """What the policy reads at every layer given: the env's observation ``features`` (an
    observation mode of :mod:`cee_env.observations`) from states [N, l, H] and log-probs [N, l, C]
    of layers 1..l. numpy in, numpy out; torch tensors in, a float32 tensor out."""
    if isinstance(log_probs, torch.Tensor):
        st = None if states is None else states.detach().float().cpu().numpy()
        return torch.from_numpy(observe(st, log_probs.detach().float().cpu().numpy(), features, num_layers))
    return observe(states, log_probs, features, num_layers)


class LayerMLPPolicy(nn.Module):
    """pi(exit | s_l): per layer a two-layer MLP (H -> hidden -> 1, GELU, sigmoid), as in the paper.

    ``state_dim`` is the input size, the size of the observation mode ``features`` reads
    (:func:`cee_env.observations.obs_size`: H for the paper's "state").
    ``shared=True`` uses one MLP for all layers with a learned layer embedding added
    to its hidden units. States are standardised with per-feature statistics
    ``mean``/``std`` taken from the training cache (stored with the policy).
    """

    def __init__(self, state_dim: int, num_layers: int, hidden: int = 32, shared: bool = False,
                 features: str = "state") -> None:
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        self.state_dim, self.num_layers, self.hidden, self.shared = state_dim, num_layers, hidden, shared
        self.features = features
        n = 1 if shared else num_layers
        self.w1 = nn.Parameter(torch.empty(n, state_dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(n, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, 1))
        self.b2 = nn.Parameter(torch.zeros(n, 1))
        self.layer_emb = nn.Parameter(torch.zeros(num_layers, hidden)) if shared else None
        for w in (self.w1, self.w2):
            nn.init.kaiming_uniform_(w.view(-1, w.shape[-1]).T, a=5 ** 0.5)
        self.register_buffer("mean", torch.zeros(state_dim))
        self.register_buffer("std", torch.ones(state_dim))

    def set_normaliser(self, states: np.ndarray) -> None:
        flat = np.asarray(states, dtype=np.float64).reshape(-1, self.state_dim)
        self.mean.copy_(torch.as_tensor(flat.mean(0), dtype=torch.float32))
        self.std.copy_(torch.as_tensor(flat.std(0) + 1e-4, dtype=torch.float32))

    def logits(self, states: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """Exit logits for states [B, H] at 0-based layers [B]."""
        x = (states - self.mean) / self.std
        if not self.shared and len(layers) and bool((layers == layers[0]).all()):  # one layer: no weight gather
            g = int(layers[0])
            h = nn.functional.gelu(x @ self.w1[g] + self.b1[g])
            return (h @ self.w2[g]).squeeze(-1) + self.b2[g]
        idx = torch.zeros_like(layers) if self.shared else layers
        h = torch.einsum("bd,bdk->bk", x, self.w1[idx]) if x.shape[0] <= 64 else self._grouped(x, idx)
        h = h + self.b1[idx]
        if self.shared:
            h = h + self.layer_emb[layers]
        h = nn.functional.gelu(h)
        return (h.unsqueeze(1) @ self.w2[idx]).squeeze(-1).squeeze(-1) + self.b2[idx].squeeze(-1)

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], self.hidden)
        for g in idx.unique().tolist():
            sel = idx == g
            out[sel] = x[sel] @ self.w1[g]
        return out

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``all_layer_logits``; a forward so DDP (joint training) syncs the policy's gradients."""
        return self.all_layer_logits(states)

    def all_layer_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Exit logits for states [N, L, H] at every layer: [N, L]."""
        x = (states - self.mean) / self.std
        if self.shared:
            h = x @ self.w1[0] + self.b1[0] + self.layer_emb
            return (nn.functional.gelu(h) @ self.w2[0]).squeeze(-1) + self.b2[0]
        h = torch.einsum("nld,ldk->nlk", x, self.w1) + self.b1
        return torch.einsum("nlk,lko->nlo", nn.functional.gelu(h), self.w2).squeeze(-1) + self.b2.squeeze(-1)

    # ----------------------------------------------------------- save / load
    def save(self, out_dir: str | os.PathLike, extra: dict | None = None) -> None:
        """policy.safetensors, then policy.json (architecture, ``extra``, the weights' sha256), each atomic.

        Parameters holding NaN/inf are refused before anything is written, so a diverged run never
        replaces a good policy of the same name (and its caller writes no results). A ``checkpoint``
        in ``extra`` is stored relative to the runs directory when it lies inside it."""
        out = Path(out_dir)
        sha = save_tensors(out / WEIGHTS, self.state_dict(), "the exit policy's parameters")
        cfg = {"state_dim": self.state_dim, "num_layers": self.num_layers, "hidden": self.hidden,
               "shared": self.shared, "features": self.features, **(extra or {})}
        if cfg.get("checkpoint"):
            cfg["checkpoint"] = stored_path(cfg["checkpoint"])
        write_json(out / "policy.json", {**cfg, "sha256": {WEIGHTS: sha}}, indent=2)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "LayerMLPPolicy":
        """Load a saved policy; policy.safetensors must match the sha256 in policy.json and be finite
        (:class:`~backbones.files.IntegrityError` naming the file otherwise)."""
        d = Path(run_dir)
        fix = f"the policy in {d} cannot be trusted: train it again (or restore the folder from a copy)"
        cfg = read_json(d / "policy.json", fix)
        state = load_tensors(d / WEIGHTS, cfg.get("sha256", {}).get(WEIGHTS), fix)
        net = cls(cfg["state_dim"], cfg["num_layers"], cfg["hidden"], cfg["shared"], cfg.get("features", "state"))
        net.load_state_dict(state)
        return net.eval()
