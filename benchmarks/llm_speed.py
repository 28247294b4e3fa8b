"""Tokens/s of early-exit decoding on SmolLM2-135M vs the exit layer (state copying included).

    python -m benchmarks.llm_speed --prompts 4 --max-new-tokens 24

Static exit rules (every token exits at layer t) are timed round-robin per prompt, so a change of machine
load hits every configuration alike; also Hugging Face's greedy ``generate`` and the CALM softmax
rule's per-layer lm_head overhead (threshold 2.0: never exits, so it pays one lm_head per layer).
With ``--batch-sizes 4,16`` the static rules are also timed on left-padded batches (``generate_batch``:
tokens/s counts every row's tokens). Prints tokens/s and the speed-up over full depth; writes
runs/llm/speed.json.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from backbones.cli import parse, user_errors
from backbones.files import write_json


@dataclass
class Args:
    """Settings of ``python -m benchmarks.llm_speed``; every field is a flag."""

    prompts: int = 4
    """held-out Alpaca prompts"""
    max_new_tokens: int = 24
    """tokens per prompt (no EOS stop)"""
    layers: str = "5,10,15,20,25,30"
    """static exit layers to time, comma-separated"""
    threads: int = 1
    """torch threads"""
    batch_sizes: str = ""
    """also time the static rules on batches of these sizes, comma-separated"""


@user_errors
def main(argv: list[str] | None = None) -> dict:
    a = parse(Args, argv, __doc__)
    torch.set_num_threads(a.threads)
    from agents.llm.decode import FullDepth, SoftmaxResponse, StaticLayer, generate, generate_batch
    from backbones.llm import ExitHeads, alpaca_rows, load_llm, prompt_ids
    from backbones.paths import runs_dir

    model, tok, _ = load_llm(verbose=False)
    heads = ExitHeads.from_model(model)
    prompts = [prompt_ids(tok, r) for r in alpaca_rows("eval")[: a.prompts]]
    rules = {f"static-{t}": StaticLayer(int(t)) for t in a.layers.split(",")}
    rules["full (own loop)"] = FullDepth()
    rules["calm-softmax overhead (no exit)"] = SoftmaxResponse(2.0)
    tokens = {k: 0 for k in [*rules, "hf generate"]}
    secs = dict.fromkeys(tokens, 0.0)
    for pr in prompts:
        for name, rule in rules.items():
            g = generate(model, heads, pr, rule, a.max_new_tokens)
            tokens[name] += len(g.tokens)
            secs[name] += g.seconds
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([pr]), max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
        secs["hf generate"] += time.perf_counter() - t0
        tokens["hf generate"] += out.shape[1] - len(pr)
    for bs in [int(b) for b in a.batch_sizes.split(",") if b.strip()]:
        batch = [prompts[i % len(prompts)] for i in range(bs)]
        for t in [*a.layers.split(","), "full"]:
            name = f"batch {bs}: " + (f"static-{t}" if t != "full" else "full")
            outs = generate_batch(model, heads, batch, StaticLayer(int(t)) if t != "full" else FullDepth(),
                                  a.max_new_tokens)
            tokens[name], secs[name] = sum(len(g.tokens) for g in outs), outs[0].seconds
    tps = {k: tokens[k] / secs[k] for k in tokens}

    def base(k: str) -> float:  # batched rows against full depth at the same batch size
        return tps[k.split(":")[0] + ": full"] if k.startswith("batch ") else tps["full (own loop)"]

    print(f"{'config':<34} {'tokens/s':>8} {'speed-up':>8}")
    for k, v in tps.items():
        print(f"{k:<34} {v:8.1f} {v / base(k):8.2f}")
    res = {"tokens_per_s": tps, "speedup_vs_full": {k: v / base(k) for k, v in tps.items()}, "args": asdict(a)}
    write_json(runs_dir() / "llm" / "speed.json", res)
    return res


if __name__ == "__main__":
    main()
