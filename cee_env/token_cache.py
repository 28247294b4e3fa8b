"""Token-level layer caches for generation: one "instance" is one response position of a prompt (issue 8).

Serves ``cee/Alpaca-v0``: a :class:`~cee_env.cache.LayerCache` whose instances are token positions of
Alpaca answers under SmolLM2-135M-Instruct with trained exit heads (:mod:`backbones.llm`).

Encoding (the env reads ``log_probs[n, l, label]`` as log p_t(y|x) and ``correct = argmax == label``):

- ``states``    float32 [N, L, H]: the last token's hidden state after layer l (pre-norm), the policy's s_l
- ``log_probs`` float32 [N, L, 2]: column 0 = log p_l(target), column 1 = the largest log-probability
  of any *other* vocabulary token, max_{v != target} log p_l(v)
- ``labels``    int64   [N], all 0: the target sits in column 0

so ``log_probs[n, l, labels[n]]`` is exactly log p_l(target | x) (the reward of Eq 3/4), and
``argmax_c log_probs[n, l, c] == 0`` iff the layer-l head's top token is the target (ties count as
correct), so ``preds == labels``, Eq 7's memorized layer and the evaluator's accuracy are token
agreement with the target. The two columns are not a distribution (they need not sum to <= 1 in
probability); do not use ``obs="state_probs"`` with these caches. The target is the full model's
greedy next token (default; "agreement with full depth") or the reference token (``target="reference"``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from cee_env.cache import LayerCache, load_cache, load_if_usable, save_cache

OBS_BOUND = 1000.0  # SmolLM2's residual stream reaches ~700 in deep layers; the default bound 50 would clip it
TASK = "Alpaca"


def token_log_probs(heads, states: np.ndarray, target: np.ndarray, batch: int = 16) -> np.ndarray:
    """[N, L, 2]: log p_l(target) and max_{v != target} log p_l(v) for every position and layer."""
    import torch

    out = np.empty((len(states), states.shape[1], 2), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(states), batch):
            logp = torch.log_softmax(heads.logits(torch.as_tensor(np.asarray(states[i:i + batch]))), -1)
            y = torch.as_tensor(target[i:i + batch]).view(-1, 1, 1).expand(-1, logp.shape[1], 1)
            out[i:i + batch, :, 0] = logp.gather(-1, y)[..., 0].numpy()
            out[i:i + batch, :, 1] = logp.scatter(-1, y, float("-inf")).amax(-1).numpy()
    return out


def make_token_cache(heads, states: np.ndarray, target: np.ndarray, split: str = "train",
                     meta: dict | None = None, fingerprint: str = "") -> LayerCache:
    """A LayerCache of token positions with the 2-column encoding described in the module docstring."""
    states = np.ascontiguousarray(states, dtype=np.float32)
    return LayerCache(states=states, log_probs=token_log_probs(heads, states, np.asarray(target)),
                      labels=np.zeros(len(states), dtype=np.int64), task=TASK, split=split,
                      label_names=("target", "best_other"), metric="accuracy", fingerprint=fingerprint,
                      meta=dict(meta or {}))


def _sha(path: Path) -> str:
    from cee_env.cache import _sha256_file

    return _sha256_file(path) if path.is_file() else "none"


def get_token_cache(split: str = "train", n_prompts: int | None = None, per_prompt: int = 16,
                    target: str = "greedy", heads_dir: str | None = None, model: str | None = None,
                    data_dir: str | None = None, prompt_offset: int | None = None, seed: int = 0,
                    rebuild: bool = False, verbose: bool = True) -> LayerCache:
    """The token cache of ``split`` ("train": Alpaca rows from ``prompt_offset`` (default 1000, past the
    rows stage 1 trains the heads on); "dev"/"eval"/"test": the held-out last 500 rows), built on first
    use under ``runs/llm/cache/`` and memory-mapped afterwards. ``heads_dir`` defaults to
    ``runs/llm/heads`` (train them with ``python -m backbones.llm``)."""
    from backbones import llm
    from backbones.paths import runs_dir

    if target not in ("greedy", "reference"):
        raise ValueError(f"target must be 'greedy' or 'reference', got {target!r}")
    rows_split = "train" if split == "train" else "eval"
    if n_prompts is None:
        n_prompts = 48 if split == "train" else 24
    offset = (1000 if split == "train" else 0) if prompt_offset is None else prompt_offset
    hd = Path(heads_dir) if heads_dir else llm.default_heads_dir()
    if not (hd / "exit_heads.safetensors").is_file():
        raise FileNotFoundError(f"no trained exit heads in {hd}; run `python -m backbones.llm` first "
                                "(or pass heads_dir=)")
    model = llm.heads_model(hd, model)
    parts = {"heads": _sha(hd / "exit_heads.safetensors"), "model": model or "smollm2-gguf", "split": rows_split,
             "n": n_prompts, "per": per_prompt, "target": target, "offset": offset, "seed": seed, "v": 1}
    fp = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    folder = runs_dir() / "llm" / "cache" / f"{split}-{fp[:16]}"
    if not rebuild and (cached := load_if_usable(folder, fp)) is not None:
        return cached
    if verbose:
        print(f"building the token cache {split} ({n_prompts} prompts x {per_prompt} positions) in {folder}")
    m, tok, _ = llm.load_llm(model, verbose=verbose)
    heads = llm.ExitHeads.load(hd, m)
    rows = llm.alpaca_rows(rows_split, data_dir)[offset:]
    pos = llm.collect_positions(m, tok, rows, n_prompts, per_prompt, seed=seed, progress=verbose)
    y = pos.greedy if target == "greedy" else pos.reference
    cache = make_token_cache(heads, pos.states, y, split=split, fingerprint=fp,
                             meta={**parts, "heads_dir": str(hd), "prompt": pos.prompt.tolist(),
                                   "greedy_equals_reference": float((pos.greedy == pos.reference).mean())})
    save_cache(cache, folder)
    return load_cache(folder, fp)


def make_caches(**kw) -> dict[str, LayerCache]:
    """{"train": ..., "dev": ...} token caches, ready for ``agents.reinforce.train(args, caches)``."""
    return {"train": get_token_cache("train", **kw), "dev": get_token_cache("dev", **kw)}


def _resolve(cache, split, data_dir, cache_kwargs) -> LayerCache:
    if cache is not None:
        return cache
    return get_token_cache(split or "train", data_dir=data_dir, **(cache_kwargs or {}))


def make_env(cache: LayerCache | None = None, *, task: str | None = TASK, split: str | None = None,
             checkpoint: str | None = None, data_dir: str | None = None, test_file: str | None = None,
             cache_kwargs: dict[str, Any] | None = None, obs_bound: float = OBS_BOUND, **kwargs):
    """Entry point of ``cee/Alpaca-v0``: an :class:`~cee_env.env.EarlyExitEnv` over a token cache
    (``cache=`` or built by :func:`get_token_cache` with ``cache_kwargs``). ``task``/``checkpoint``/
    ``test_file`` are accepted for signature compatibility and ignored."""
    from cee_env.env import EarlyExitEnv

    return EarlyExitEnv(cache=_resolve(cache, split, data_dir, cache_kwargs), split=split, obs_bound=obs_bound,
                        **kwargs)


def make_vector_env(num_envs: int, cache: LayerCache | None = None, *, task: str | None = TASK,
                    split: str | None = None, checkpoint: str | None = None, data_dir: str | None = None,
                    test_file: str | None = None, cache_kwargs: dict[str, Any] | None = None,
                    obs_bound: float = OBS_BOUND, **kwargs):
    """Vector entry point of ``cee/Alpaca-v0`` (:class:`~cee_env.vector_env.EarlyExitVectorEnv`)."""
    from cee_env.vector_env import EarlyExitVectorEnv

    return EarlyExitVectorEnv(num_envs, cache=_resolve(cache, split, data_dir, cache_kwargs), split=split,
                              obs_bound=obs_bound, **kwargs)
