"""Alpaca prompts and the per-layer hidden states of their answer positions (stage-1 data)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from backbones.files import write_with
from backbones.llm.model import decoder_parts


HELD_OUT = 500  # the last rows of alpaca_5000.json are never trained on
ALPACA_FILE = "alpaca/alpaca_5000.json"


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



def alpaca_sequences(tok, rows: list[dict], n_prompts: int, max_response: int = 64) -> list[tuple[list[int], int]]:
    """(prompt + reference answer + end-of-turn token ids, index of the first answer token) per row."""
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    out = []
    for r in rows[:n_prompts]:
        p = prompt_ids(tok, r)
        out.append((p + tok(r["output"], add_special_tokens=False)["input_ids"][:max_response] + [eos], len(p)))
    return out



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
    write_with(f, lambda tmp: np.savez(tmp, **asdict(pos)))
    return pos
