"""Exit heads of the decoder LLM: per-layer (affine) translators into the shared lm_head, Eq 1 training, LoRA."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones.files import write_json, write_with
from backbones.llm.data import layer_states_grad
from backbones.llm.model import decoder_parts


class ExitHeads(nn.Module):
    """p_l(. | s_l) = softmax(lm_head(g_l * T_l(u)) [+ adapter_l]) for l = 1..L, lm_head shared and frozen,
    where u = s_l / rms(s_l) is the RMS-normalised state.

    ``norm_weight`` g_l [L, H] starts as the model's final-norm weight. ``affine=True`` adds a full
    translator T_l(u) = u + u A_l + b_l per layer (A_l, b_l zero-initialised, so it starts as the
    identity; the "tuned lens" of Belrose et al. 2023, applied after the scale normalisation so it is
    well conditioned whatever the residual stream's size); otherwise T_l is the identity.
    ``rank > 0`` adds a per-layer low-rank residual adapter after the norm (zero-initialised too).
    ``freeze_last`` keeps the last layer's head equal to the model's own output.
    """

    def __init__(self, lm_head_weight: torch.Tensor, final_norm_weight: torch.Tensor, num_layers: int,
                 eps: float = 1e-5, rank: int = 0, freeze_last: bool = True, affine: bool = False) -> None:
        super().__init__()
        self.num_layers, self.eps, self.rank, self.freeze_last = num_layers, float(eps), int(rank), freeze_last
        self.affine = bool(affine)
        H = final_norm_weight.shape[0]
        self.register_buffer("lm_head_weight", lm_head_weight.detach().float(), persistent=False)
        self.norm_weight = nn.Parameter(final_norm_weight.detach().float().clone().repeat(num_layers, 1))
        if self.affine:
            self.trans_weight = nn.Parameter(torch.zeros(num_layers, H, H))
            self.trans_bias = nn.Parameter(torch.zeros(num_layers, H))
        if rank > 0:
            self.down = nn.Parameter(torch.randn(num_layers, H, rank) / H ** 0.5)
            self.up = nn.Parameter(torch.zeros(num_layers, rank, H))
        if freeze_last:  # the last layer's head stays the model's own output (norm and adapter)
            for prm in self.parameters():
                prm.register_hook(self._zero_last)

    @staticmethod
    def _zero_last(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[-1] = 0
        return g

    @classmethod
    def from_model(cls, model, rank: int = 0, freeze_last: bool = True, affine: bool = False) -> "ExitHeads":
        _, norm, head, _, _ = decoder_parts(model)
        return cls(head.weight, norm.weight, model.config.num_hidden_layers, getattr(norm, "variance_epsilon", 1e-5),
                   rank, freeze_last, affine)

    def normed(self, states: torch.Tensor, layers: torch.Tensor | int | None = None) -> torch.Tensor:
        """RMSNorm_l(s_l) (+ adapter): states [..., L, H] for all layers (layers=None), or [B, H] at ``layers``."""
        x = states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if layers is None:
            if self.affine:
                x = x + torch.einsum("...lh,lhk->...lk", x, self.trans_weight) + self.trans_bias
            w = self.norm_weight
            x = x * w
            if self.rank:
                x = x + torch.einsum("...lh,lhr,lrk->...lk", x, self.down, self.up)
            return x
        if self.affine:
            A = self.trans_weight[layers]
            x = x + ((x.unsqueeze(-2) @ A).squeeze(-2) if A.dim() == 3 else x @ A) + self.trans_bias[layers]
        w = self.norm_weight[layers]
        x = x * w
        if self.rank:
            x = x + ((x.unsqueeze(-2) @ self.down[layers]) @ self.up[layers]).squeeze(-2)
        return x

    def param_groups(self, lr: float, trans_lr: float) -> list[dict]:
        """Adam parameter groups: the norms and adapters at ``lr``, the affine translators at ``trans_lr``."""
        named = list(self.named_parameters())
        groups = [{"params": [p for n, p in named if not n.startswith("trans_")], "lr": lr}]
        if self.affine:
            groups.append({"params": [self.trans_weight, self.trans_bias], "lr": trans_lr})
        return groups

    def logits(self, states: torch.Tensor, layers: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.normed(states, layers) @ self.lm_head_weight.T

    def save(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(folder)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        write_with(out / "exit_heads.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        cfg = {"num_layers": self.num_layers, "eps": self.eps, "rank": self.rank, "freeze_last": self.freeze_last,
               "affine": self.affine, **(extra or {})}
        write_json(out / "exit_heads.json", cfg)

    @classmethod
    def load(cls, folder: str | os.PathLike, model) -> "ExitHeads":
        from safetensors.torch import load_file

        cfg = json.loads((Path(folder) / "exit_heads.json").read_text())
        heads = cls.from_model(model, rank=cfg["rank"], freeze_last=cfg["freeze_last"],
                               affine=cfg.get("affine", False))
        heads.load_state_dict(load_file(str(Path(folder) / "exit_heads.safetensors")))
        return heads.eval()


def eq1_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Paper Eq 1: sum_l w_l CE(y, p_l) / sum_l w_l with w_l = l; logits [B, L, V], target [B] token ids
    or [B, V] probabilities (soft labels: the cross-entropy with a distribution, i.e. KL up to a constant)."""
    B, L, V = logits.shape
    if target.dim() == 2:
        ce = -(torch.log_softmax(logits, -1) * target.unsqueeze(1)).sum(-1)
    else:
        ce = nn.functional.cross_entropy(logits.reshape(B * L, V), target.repeat_interleave(L),
                                         reduction="none").view(B, L)
    w = torch.arange(1, L + 1, dtype=ce.dtype, device=ce.device)
    return (ce * w).sum(1).mean() / w.sum()


@torch.no_grad()
def head_agreement(heads: ExitHeads, states: np.ndarray, target: np.ndarray, batch: int = 32) -> np.ndarray:
    """Per layer, the fraction of positions whose head argmax equals ``target``: float [L]."""
    hits = np.zeros(states.shape[1])
    for i in range(0, len(states), batch):
        pred = heads.logits(torch.as_tensor(states[i:i + batch])).argmax(-1).numpy()
        hits += (pred == target[i:i + batch, None]).sum(0)
    return hits / len(states)


def _step(opt, loss: torch.Tensor, losses: list[float], bar) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    bar.update()
    bar.set_postfix(loss=f"{loss.item():.3f}")


def train_heads(heads: ExitHeads, states: np.ndarray, target: np.ndarray | None, epochs: int = 2, lr: float = 1e-2,
                batch: int = 32, seed: int = 0, progress: bool = True, trans_lr: float = 1e-3) -> list[float]:
    """Eq 1 on cached states (the backbone is not touched). Returns the loss of every step.

    ``target=None``: soft labels, the full model's next-token distribution at each position (read off the
    last layer's state through the frozen last head). ``trans_lr``: Adam step of the affine translators."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(heads.param_groups(lr, trans_lr))
    losses = []
    heads.train()
    steps = epochs * int(np.ceil(len(states) / batch))
    bar = tqdm(total=steps, desc="stage 1 (Eq 1)", disable=not progress)
    for _ in range(epochs):
        order = rng.permutation(len(states))
        for i in range(0, len(order), batch):
            ids = order[i:i + batch]
            x = torch.as_tensor(states[ids])
            if target is None:
                with torch.no_grad():
                    y = torch.softmax(heads.logits(x[:, -1], heads.num_layers - 1), -1)
            else:
                y = torch.as_tensor(target[ids])
            loss = eq1_loss(heads.logits(x), y)
            _step(opt, loss, losses, bar)
    bar.close()
    heads.eval()
    return losses


# --------------------------------------------------------------------------- LoRA on the backbone
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_train(model, heads: ExitHeads, seqs: list[tuple[list[int], int]], rank: int = 8, epochs: int = 1,
               lr: float = 1e-4, head_lr: float = 1e-2, trans_lr: float = 1e-3, target: str = "soft",
               seed: int = 0, progress: bool = True):
    """Eq 1 with LoRA adapters (peft) on every linear layer of the backbone, trained together with the heads.

    ``seqs``: (token ids, first response position) pairs; the states at positions ``first - 1 .. T - 2``
    predict the response tokens. ``target``: ``soft`` (the original model's next-token distribution),
    ``greedy`` (its argmax) or ``reference`` (the next token of the sequence). The original model is the
    peft model with its adapters disabled, so the targets never move. One sequence per step.
    Returns (the model with the adapters merged in, the loss of every step). Needs the backward pass
    through the whole backbone: minutes per hundred sequences on a CPU.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    if target not in ("soft", "greedy", "reference"):
        raise ValueError(f"target must be soft, greedy or reference, got {target!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                          target_modules=list(LORA_TARGETS)))
    pm.train()
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam([{"params": lora, "lr": lr}, *heads.param_groups(head_lr, trans_lr)])
    heads.train()
    losses = []
    bar = tqdm(total=epochs * len(seqs), desc="stage 1 (Eq 1, LoRA)", disable=not progress)
    for _ in range(epochs):
        for k in rng.permutation(len(seqs)):
            ids, first = seqs[k]
            x = torch.tensor([ids])
            pos = torch.arange(first - 1, len(ids) - 1)
            if target == "reference":
                y = x[0, pos + 1]
            else:
                with torch.no_grad(), pm.disable_adapter():
                    t_logits = pm(input_ids=x, use_cache=False).logits[0, pos]
                y = torch.softmax(t_logits, -1) if target == "soft" else t_logits.argmax(-1)
            states, _ = layer_states_grad(pm, x)
            loss = eq1_loss(heads.logits(states[pos]), y)
            _step(opt, loss, losses, bar)
    bar.close()
    heads.eval()
    merged = pm.merge_and_unload()
    merged.eval().requires_grad_(False)
    return merged, losses
