"""A decoder-only LLM (SmolLM2-135M-Instruct) with an exit head after every layer (issue 8).

    python -m backbones.llm                                  # defaults: affine heads, soft labels, 500 prompts
    python -m backbones.llm --no-affine --loss hard --n-prompts 48 --per-prompt 16   # norm-only heads
    python -m backbones.llm --compare runs/llm/heads_a runs/llm/heads_b   # held-out agreement of trained heads

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

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from backbones.cli import parse, user_errors
from backbones.files import write_json
from backbones.llm.data import alpaca_rows, alpaca_sequences, cached_positions, collect_positions
from backbones.llm.heads import ExitHeads, head_agreement, lora_train, train_heads
from backbones.llm.model import load_llm


@dataclass
class Stage1Args:
    """Stage-1 settings of the exit heads; every field is a flag of ``python -m backbones.llm``."""

    model: str | None = None
    """HF causal-LM folder/name; None: the packaged SmolLM2 GGUF"""
    n_prompts: int = 500
    """training prompts (Alpaca rows, excluding the last 500)"""
    per_prompt: int = 0
    """response positions sampled per prompt (0: all)"""
    eval_prompts: int = 30
    """held-out prompts for head agreement"""
    target: Literal["greedy", "reference"] = "greedy"
    """train on the full model's greedy next token or the reference token (--loss hard)"""
    loss: Literal["hard", "soft"] = "soft"
    """hard: Eq 1 on one target token; soft: on the full model's next-token distribution"""
    epochs: int = 2
    """passes over the cached positions"""
    lr: float = 1e-2
    """Adam learning rate of the heads"""
    trans_lr: float = 1e-3
    """Adam learning rate of the affine translators"""
    batch: int = 32
    """positions per step (x L layers)"""
    rank: int = 0
    """low-rank adapter per head (0: off)"""
    affine: bool = True
    """a full affine translator per head (tuned lens); --no-affine: a trained norm only"""
    lora_rank: int = 0
    """also train LoRA adapters of this rank on the backbone (peft; needs a backward pass through the model:
    slow on a CPU). The adapted model is saved in <out>/model"""
    lora_lr: float = 1e-4
    """Adam learning rate of the LoRA adapters"""
    max_response: int = 64
    """reference-answer tokens teacher-forced per prompt"""
    seed: int = 0
    """random seed"""
    out: str | None = None
    """output folder; None: runs/llm/heads"""
    data_dir: str | None = None
    """data directory; None: $CEE_DATA_DIR or ../shared/data"""
    threads: int = 1
    """torch threads"""
    compare: tuple[str, ...] = ()
    """HEADS_DIR ...: train nothing; print the held-out agreement per layer of these heads folders (and of
    untrained heads) on the same positions"""


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
    write_json(out / "stage1_results.json", res)
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
    write_json(runs_dir() / "llm" / "heads_comparison.json", res)
    return res


@user_errors
def main(argv: list[str] | None = None) -> dict:
    a = parse(Stage1Args, argv, __doc__)
    if a.compare:
        return compare_heads(list(a.compare), a.eval_prompts, a.per_prompt, a.max_response, a.seed + 1, a.data_dir,
                             a.threads)
    return stage1(a)


if __name__ == "__main__":
    main()
