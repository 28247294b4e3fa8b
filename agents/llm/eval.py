"""ROUGE-L vs speed-up of token-level early exit on SmolLM2-135M: ConsistentEE (alpha sweep) vs CALM.

    python -m agents.llm.eval                                  # defaults: 20 held-out prompts x 48 tokens
    python -m agents.llm.eval --n-prompts 500 --timing-prompts 40 --batch-size 16   # all 500 held-out prompts

1. Token caches (``cee_env.token_cache``) of training and held-out positions, built on first use.
2. One ConsistentEE policy per alpha: ``agents.reinforce.train`` on ``cee/Alpaca-v0`` (frozen heads).
3. Quality: greedy decoding of held-out Alpaca prompts (the last 500 rows; never trained on) at full
   depth and with every rule (``agents.llm.decode``, state copying on), in left-padded batches of
   ``--batch-size`` (the outputs equal one-prompt-at-a-time decoding): ROUGE-L F1 against the full
   model's output and against the reference answer, average exit layer, layer speed-up
   L / avg exit layer.
4. Speed: the first ``--timing-prompts`` prompts again one at a time (batch 1, the setting where
   early exit saves time): tokens/s per rule, and its ratio to full depth = measured speed-up.
5. A table, examples at about 2x and 5x layer speed-up (``examples.md``), ``results.json`` and
   ``rouge_vs_speedup.png`` in ``runs/llm/eval`` (``--out``).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from backbones.cli import UserError, parse, user_errors
from backbones.files import write_json, write_text, write_with


def runs_dir_default() -> Path:
    from backbones.paths import runs_dir

    return runs_dir() / "llm" / "eval"


def policy_points(s: str) -> list[tuple[float, float]]:
    """``"0.8:0.3,0.85:0.9"`` -> [(0.8, 0.3), (0.85, 0.9)]: (alpha, exit threshold on pi) pairs."""
    out = []
    for item in (x.strip() for x in s.split(",")):
        if item:
            al, _, th = item.partition(":")
            try:
                out.append((float(al), float(th)))
            except ValueError:
                raise UserError(f"--policy-points: {item!r} is not ALPHA:THRESHOLD") from None
    return out


def _floats(s: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} expects comma-separated numbers; got {s!r}") from None


def rouge_l(preds: list[str], refs: list[str]) -> float:
    """Mean ROUGE-L F1. Identical texts score 1 (rouge_score keeps only [a-z0-9] words, so a text of symbols
    or non-Latin script alone would otherwise score 0 against itself)."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([1.0 if p.strip() == r.strip() else sc.score(r, p)["rougeL"].fmeasure
                          for p, r in zip(preds, refs)]))


def rescore(out_dir: Path, n_examples: int = 2) -> dict:
    """Recompute ROUGE-L, the table, the examples and the plot of a finished run from its results.json
    (the decoded texts are stored there; nothing is decoded again)."""
    from backbones.llm import alpaca_rows, instruction_text

    s = json.loads((out_dir / "results.json").read_text())
    rows = alpaca_rows("eval")[: s["n_prompts"]]
    refs = [r["output"] for r in rows]
    full = next(r for r in s["results"] if r["method"] == "full")
    for r in s["results"]:
        r["rougeL_vs_full"] = rouge_l(r["texts"], full["texts"])
        r["rougeL_vs_reference"] = rouge_l(r["texts"], refs)
    s["examples"] = pick_examples(s["results"], [instruction_text(pr) for pr in rows], refs, n_examples)
    write_outputs(s, out_dir)
    return s


def write_outputs(summary: dict, out_dir: Path) -> None:
    write_json(out_dir / "results.json", summary)
    write_text(out_dir / "examples.md", examples_markdown(summary["examples"]))
    write_text(out_dir / "table.md", markdown_table(summary))
    plot(summary["results"], out_dir / "rouge_vs_speedup.png")
    print_table(summary)
    print(f"\nexamples in {out_dir / 'examples.md'}, table in {out_dir / 'table.md'}")


def decode_all(model, heads, tok, prompts, rule, max_new_tokens, eos, batch_size: int = 1):
    """Decode ``prompts`` in batches of ``batch_size`` (longest-first, so rows of a batch pad little);
    texts come back in prompt order. ``seconds`` is the summed wall time of the batches' token loops."""
    from agents.llm.decode import generate_batch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    gens, secs = [None] * len(prompts), 0.0
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        out = generate_batch(model, heads, [prompts[j] for j in chunk], rule, max_new_tokens, eos)
        secs += out[0].seconds
        for j, g in zip(chunk, out):
            gens[j] = g
    n_tok = sum(len(g.tokens) for g in gens)
    exits = [e for g in gens for e in g.exit_layers]
    texts = [tok.decode(g.tokens, skip_special_tokens=True) for g in gens]
    return {"texts": texts, "tokens": n_tok, "seconds": secs, "tokens_per_s": n_tok / max(secs, 1e-9),
            "avg_exit_layer": float(np.mean(exits)), "exit_hist": np.bincount(exits, minlength=model.config.num_hidden_layers + 1)[1:].tolist()}


def uniform_exit_prior(num_layers: int, state_dim: int, seed: int = 0):
    """A LayerMLPPolicy whose initial exit probability at layer l is 1/(L - l + 1): sampled exit layers start
    uniform over 1..L. With L = 30 a pi = 0.5 start almost never samples a trajectory past layer ~5, so
    REINFORCE never sees what deep layers earn (and collapses to exiting at layer ~3)."""
    from agents.policies.net import LayerMLPPolicy

    torch.manual_seed(seed)
    net = LayerMLPPolicy(state_dim, num_layers)
    with torch.no_grad():
        net.w2.mul_(0.1)
        p = 1.0 / (num_layers - torch.arange(num_layers, dtype=torch.float32))
        net.b2[:, 0] = torch.logit(p.clamp(max=1 - 1e-4))
    return net


@dataclass
class EvalArgs:
    """Settings of ``python -m agents.llm.eval``; every field is a flag."""

    n_prompts: int = 20
    """held-out prompts to decode (at most 500)"""
    timing_prompts: int = 20
    """of those, how many are decoded again one at a time to measure tokens/s"""
    batch_size: int = 16
    """prompts per batch of the quality decode"""
    n_examples: int = 2
    """example prompts per rule in examples.md"""
    policies_only: bool = False
    """train the policies and print their dev token agreement / exit layer, decode nothing"""
    max_new_tokens: int = 48
    """tokens generated per prompt"""
    alphas: str = "0.25,0.5,0.6,0.7,0.8,0.9"
    """ConsistentEE depth penalties alpha, comma-separated (per layer; log p is in nats)"""
    reward: str = "hardness"
    """reward of the policy (hardness = Eq 4, vanilla = Eq 3)"""
    policy_epochs: int = 10
    """REINFORCE epochs per alpha"""
    policy_lr: float = 1e-3
    """REINFORCE learning rate"""
    policy_points: str = ""
    """extra ConsistentEE rules ALPHA:THRESHOLD,... (that alpha's policy exiting when pi > THRESHOLD instead of
    0.5; the alpha must be in --alphas)"""
    softmax: str = "0.9,0.5,0.2"
    """CALM softmax-response thresholds (top1 - top2), comma-separated ("" for none)"""
    saturation: str = "0.995,0.98,0.95"
    """CALM hidden-state saturation thresholds, comma-separated ("" for none)"""
    cache_prompts: int = 200
    """training prompts of the token cache"""
    per_prompt: int = 16
    """positions per prompt in the token caches"""
    heads: str | None = None
    """exit-heads folder; None: runs/llm/heads"""
    model: str | None = None
    """HF causal-LM folder; None: the heads' LoRA-adapted model if any, else the SmolLM2 GGUF"""
    out: str | None = None
    """output folder; None: runs/llm/eval"""
    threads: int = 1
    """torch threads"""
    seed: int = 0
    """random seed"""
    rescore: bool = False
    """decode nothing: recompute the scores, table, examples and plot of the run in --out"""


@user_errors
def main(argv: list[str] | None = None) -> dict:
    a = parse(EvalArgs, argv, __doc__)
    if a.rescore:
        return rescore(Path(a.out) if a.out else runs_dir_default(), a.n_examples)
    alphas, points = _floats(a.alphas, "--alphas"), policy_points(a.policy_points)
    softmax, saturation = _floats(a.softmax, "--softmax"), _floats(a.saturation, "--saturation")
    for al, th in points:
        if al not in alphas:
            raise UserError(f"--policy-points {al:g}:{th:g}: alpha {al:g} is not in --alphas")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from agents.llm.decode import FullDepth, PolicyExit, Saturation, SoftmaxResponse, eos_token_ids
    from agents.reinforce import Args, train
    from backbones.llm import (ExitHeads, alpaca_rows, default_heads_dir, heads_model, instruction_text, load_llm,
                               prompt_ids)
    from cee_env.token_cache import get_token_cache

    out_dir = Path(a.out) if a.out else runs_dir_default()
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    model_path = heads_model(a.heads, a.model)
    model, tok, info = load_llm(model_path)
    heads = ExitHeads.load(a.heads or default_heads_dir(), model)
    L = model.config.num_hidden_layers

    t = time.time()
    ck = dict(per_prompt=a.per_prompt, heads_dir=a.heads, model=model_path)
    caches = {"train": get_token_cache("train", n_prompts=a.cache_prompts, **ck),
              "dev": get_token_cache("dev", n_prompts=max(8, a.cache_prompts // 2), **ck)}
    timings["token_caches"] = round(time.time() - t, 1)

    t = time.time()
    policies, policy_dev = {}, {}
    init = out_dir / "policy_init"
    uniform_exit_prior(L, caches["train"].hidden_size, a.seed).save(init)
    for alpha in alphas:
        res = train(Args(env="cee/Alpaca-v0", alpha=alpha, reward=a.reward, epochs=a.policy_epochs, k=4,
                         lr=a.policy_lr, eps_start=0.02, init_policy=str(init), eval_every=10 ** 6, seed=a.seed,
                         quiet=True, run_name=f"Alpaca-llm-{Path(a.heads or 'heads').name}-{a.reward}-a{alpha:g}"),
                    caches)
        policies[alpha] = res["policy"].net
        policy_dev[alpha] = res["results"]["dev"]
        d = res["results"]["dev"]["consistentee"]
        print(f"alpha {alpha:g}: dev token agreement {100 * d['accuracy']:.1f}%  avg exit {d['avg_exit_layer']:.2f}/{L}")
    timings["policies"] = round(time.time() - t, 1)
    if a.policies_only:
        return {"policy_dev": {str(k): v for k, v in policy_dev.items()}, "timings_seconds": timings}

    rows = alpaca_rows("eval")[: a.n_prompts]
    prompts = [prompt_ids(tok, r) for r in rows]
    refs = [r["output"] for r in rows]
    eos = eos_token_ids(tok)
    n_time = min(a.timing_prompts, len(prompts))

    rules = [("full", None, FullDepth())]
    rules += [("consistentee", al, PolicyExit(net, name=f"consistentee-a{al:g}")) for al, net in policies.items()]
    for al, th in points:
        rules.append(("consistentee", al, PolicyExit(policies[al], th, name=f"consistentee-a{al:g}-pi{th:g}")))
    rules += [("calm-softmax", th, SoftmaxResponse(th)) for th in softmax]
    rules += [("calm-saturation", th, Saturation(th)) for th in saturation]

    # quality: every prompt, batched
    t = time.time()
    decoded = {}
    for method, param, rule in rules:
        t1 = time.time()
        decoded[rule.name] = decode_all(model, heads, tok, prompts, rule, a.max_new_tokens, eos, a.batch_size)
        decoded[rule.name]["wall_seconds"] = round(time.time() - t1, 1)
        print(f"decoded {len(prompts)} prompts with {rule.name} (batch {a.batch_size}) in "
              f"{decoded[rule.name]['wall_seconds']} s, avg exit {decoded[rule.name]['avg_exit_layer']:.2f}")
    timings["decode_quality_batched"] = round(time.time() - t, 1)

    # speed: the first n_time prompts one at a time
    t = time.time()
    timed = {rule.name: decode_all(model, heads, tok, prompts[:n_time], rule, a.max_new_tokens, eos, 1)
             for _, _, rule in rules}
    hf_tok, hf_s = 0, 0.0
    for pr in prompts[:n_time]:  # Hugging Face's own greedy generate, for the speed reference
        t1 = time.perf_counter()
        g = model.generate(torch.tensor([pr]), max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=eos,
                           pad_token_id=eos[0])
        hf_s += time.perf_counter() - t1
        hf_tok += g.shape[1] - len(pr)
    timings["decode_speed_batch1"] = round(time.time() - t, 1)
    full, full_t = decoded["full"], timed["full"]

    def row(method, param, name):
        r, s1 = decoded[name], timed[name]
        return {"name": name, "method": method, "param": param, "avg_exit_layer": r["avg_exit_layer"],
                "layer_speedup": L / r["avg_exit_layer"], "tokens_per_s": s1["tokens_per_s"],
                "measured_speedup": s1["tokens_per_s"] / full_t["tokens_per_s"],
                "batched_tokens_per_s": r["tokens_per_s"],
                "rougeL_vs_full": rouge_l(r["texts"], full["texts"]), "rougeL_vs_reference": rouge_l(r["texts"], refs),
                "tokens": r["tokens"], "exit_hist": r["exit_hist"], "wall_seconds": r["wall_seconds"],
                "texts": r["texts"]}

    results = [row(m, prm, rule.name) for m, prm, rule in rules]
    examples = pick_examples(results, [instruction_text(pr) for pr in rows], refs, a.n_examples)
    summary = {"load": info, "n_prompts": len(prompts), "timing_prompts": n_time, "batch_size": a.batch_size,
               "max_new_tokens": a.max_new_tokens, "num_layers": L, "threads": a.threads,
               "heads": str(a.heads or default_heads_dir()), "full_tokens_per_s": full_t["tokens_per_s"],
               "full_batched_tokens_per_s": full["tokens_per_s"],
               "hf_generate_tokens_per_s": hf_tok / max(hf_s, 1e-9), "timings_seconds": timings,
               "policy_dev": {str(k): v for k, v in policy_dev.items()}, "results": results, "examples": examples,
               "args": asdict(a)}
    write_outputs(summary, out_dir)
    return summary


def pick_examples(results: list[dict], instructions: list[str], refs: list[str], n: int = 2,
                  targets: tuple[float, ...] = (2.0, 5.0)) -> list[dict]:
    """For each target layer speed-up, the ConsistentEE and CALM rules nearest to it (in log ratio), with
    their outputs for the first ``n`` prompts next to the full-depth output (the paper's Table 4)."""
    full = next(r for r in results if r["method"] == "full")
    out = []
    for target in targets:
        for method in ("consistentee", "calm-softmax", "calm-saturation"):
            cands = [r for r in results if r["method"] == method]
            if not cands:
                continue
            r = min(cands, key=lambda r: abs(np.log(r["layer_speedup"] / target)))
            out.append({"target_speedup": target, "rule": r["name"], "layer_speedup": r["layer_speedup"],
                        "measured_speedup": r["measured_speedup"], "rougeL_vs_full": r["rougeL_vs_full"],
                        "prompts": [{"instruction": instructions[i], "reference": refs[i], "full": full["texts"][i],
                                     "output": r["texts"][i]} for i in range(min(n, len(r["texts"])))]})
    return out


def examples_markdown(examples: list[dict]) -> str:
    lines = ["# Early-exit generations next to full depth (held-out Alpaca prompts)", ""]
    for e in examples:
        lines += [f"## ~{e['target_speedup']:g}x: {e['rule']} (layer speed-up {e['layer_speedup']:.2f}x, "
                  f"measured {e['measured_speedup']:.2f}x, ROUGE-L vs full {e['rougeL_vs_full']:.3f})", ""]
        for p in e["prompts"]:
            q = p["instruction"].replace("\n", " ")
            lines += [f"- **Prompt:** {q}", f"  - full depth: {p['full']!r}", f"  - {e['rule']}: {p['output']!r}", ""]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x in zip(axes, ("layer_speedup", "measured_speedup")):
        for method, marker in (("consistentee", "o-"), ("calm-softmax", "s--"), ("calm-saturation", "^--")):
            rs = sorted((r for r in results if r["method"] == method), key=lambda r: r[x])
            if rs:
                ax.plot([r[x] for r in rs], [r["rougeL_vs_full"] for r in rs], marker, label=method)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel(x.replace("_", " ")), ax.set_ylabel("ROUGE-L vs full-depth output")
        ax.legend(), ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M token-level early exit (held-out Alpaca prompts)")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def markdown_table(s: dict) -> str:
    """The results as a Markdown table (what the README shows)."""
    lines = ["| rule | avg exit layer (of 30) | layer speed-up | tokens/s (batch 1) | measured speed-up | "
             "ROUGE-L vs full output | ROUGE-L vs reference |", "|---|---|---|---|---|---|---|"]
    for r in s["results"]:
        lines.append(f"| {r['name']} | {r['avg_exit_layer']:.2f} | {r['layer_speedup']:.2f}x | {r['tokens_per_s']:.1f} | "
                     f"{r['measured_speedup']:.2f}x | {r['rougeL_vs_full']:.3f} | {r['rougeL_vs_reference']:.3f} |")
    return "\n".join(lines) + "\n"


def print_table(s: dict) -> None:
    print(f"\nfull depth: {s['full_tokens_per_s']:.1f} tokens/s (own loop, batch 1), HF generate "
          f"{s['hf_generate_tokens_per_s']:.1f} tokens/s, {s.get('full_batched_tokens_per_s', float('nan')):.1f} "
          f"tokens/s in batches of {s.get('batch_size', '?')}; {s['threads']} thread(s)")
    print(f"{'rule':<26} {'avg exit':>8} {'x layers':>8} {'tok/s':>6} {'x meas.':>7} {'R-L full':>8} {'R-L ref':>7}")
    for r in s["results"]:
        print(f"{r['name']:<26} {r['avg_exit_layer']:8.2f} {r['layer_speedup']:8.2f} {r['tokens_per_s']:6.1f} "
              f"{r['measured_speedup']:7.2f} {r['rougeL_vs_full']:8.3f} {r['rougeL_vs_reference']:7.3f}")


if __name__ == "__main__":
    main()
