"""ROUGE-L vs speed-up of token-level early exit on SmolLM2-135M: ConsistentEE (alpha sweep) vs CALM.

    python -m agents.llm_eval                                  # defaults: 20 held-out prompts x 48 tokens
    python -m agents.llm_eval --n-prompts 8 --max-new-tokens 32 --alphas 0.02,0.05

1. Token caches (``cee_env.token_cache``) of training and held-out positions, built on first use.
2. One ConsistentEE policy per alpha: ``agents.reinforce.train`` on ``cee/Alpaca-v0`` (frozen heads).
3. Greedy decoding of held-out Alpaca prompts (the last 500 rows; never trained on) at full depth
   and with every rule (``agents.llm_decode``, state copying on): ROUGE-L F1 against the full
   model's output and against the reference answer, average exit layer, layer speed-up
   L / avg exit layer and measured tokens/s (its ratio to full depth = measured speed-up).
4. A table, ``runs/llm/eval/results.json`` and ``runs/llm/eval/rouge_vs_speedup.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def rouge_l(preds: list[str], refs: list[str]) -> float:
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([sc.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]))


def decode_all(model, heads, tok, prompts, rule, max_new_tokens, eos):
    from agents.llm_decode import generate

    gens = [generate(model, heads, p, rule, max_new_tokens, eos) for p in prompts]
    n_tok = sum(len(g.tokens) for g in gens)
    secs = sum(g.seconds for g in gens)
    exits = [e for g in gens for e in g.exit_layers]
    texts = [tok.decode(g.tokens, skip_special_tokens=True) for g in gens]
    return {"texts": texts, "tokens": n_tok, "seconds": secs, "tokens_per_s": n_tok / max(secs, 1e-9),
            "avg_exit_layer": float(np.mean(exits)), "exit_hist": np.bincount(exits, minlength=model.config.num_hidden_layers + 1)[1:].tolist()}


def uniform_exit_prior(num_layers: int, state_dim: int, seed: int = 0):
    """A LayerMLPPolicy whose initial exit probability at layer l is 1/(L - l + 1): sampled exit layers start
    uniform over 1..L. With L = 30 a pi = 0.5 start almost never samples a trajectory past layer ~5, so
    REINFORCE never sees what deep layers earn (and collapses to exiting at layer ~3)."""
    from backbones.policy_net import LayerMLPPolicy

    torch.manual_seed(seed)
    net = LayerMLPPolicy(state_dim, num_layers)
    with torch.no_grad():
        net.w2.mul_(0.1)
        p = 1.0 / (num_layers - torch.arange(num_layers, dtype=torch.float32))
        net.b2[:, 0] = torch.logit(p.clamp(max=1 - 1e-4))
    return net


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-prompts", type=int, default=20, help="held-out prompts to decode")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--alphas", default="1,3,10", help="ConsistentEE depth penalties alpha (per layer; log p is in nats)")
    p.add_argument("--reward", default="hardness", help="reward of the policy (hardness = Eq 4, vanilla = Eq 3)")
    p.add_argument("--policy-epochs", type=int, default=10, help="REINFORCE epochs per alpha")
    p.add_argument("--policy-lr", type=float, default=1e-3, help="REINFORCE learning rate")
    p.add_argument("--softmax", default="0.9,0.7,0.5", help="CALM softmax-response thresholds (top1 - top2)")
    p.add_argument("--saturation", default="0.995,0.99,0.98", help="CALM hidden-state saturation thresholds")
    p.add_argument("--cache-prompts", type=int, default=48, help="training prompts of the token cache")
    p.add_argument("--per-prompt", type=int, default=16, help="positions per prompt in the token caches")
    p.add_argument("--heads", default=None, help="exit-heads folder (default runs/llm/heads)")
    p.add_argument("--out", default=None, help="output folder (default runs/llm/eval)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    from agents.llm_decode import FullDepth, PolicyExit, Saturation, SoftmaxResponse, eos_token_ids
    from agents.reinforce import Args, train
    from backbones.llm import ExitHeads, alpaca_rows, default_heads_dir, load_llm, prompt_ids
    from backbones.paths import runs_dir
    from cee_env.token_cache import get_token_cache

    out_dir = Path(a.out) if a.out else runs_dir() / "llm" / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    model, tok, info = load_llm()
    heads = ExitHeads.load(a.heads or default_heads_dir(), model)
    L = model.config.num_hidden_layers

    t = time.time()
    ck = dict(per_prompt=a.per_prompt, heads_dir=a.heads)
    caches = {"train": get_token_cache("train", n_prompts=a.cache_prompts, **ck),
              "dev": get_token_cache("dev", n_prompts=max(8, a.cache_prompts // 2), **ck)}
    timings["token_caches"] = round(time.time() - t, 1)

    t = time.time()
    policies, policy_dev = {}, {}
    init = out_dir / "policy_init"
    uniform_exit_prior(L, caches["train"].hidden_size, a.seed).save(init)
    for alpha in _floats(a.alphas):
        res = train(Args(env="cee/Alpaca-v0", alpha=alpha, reward=a.reward, epochs=a.policy_epochs, k=4,
                         lr=a.policy_lr, eps_start=0.02, init_policy=str(init), eval_every=10 ** 6, seed=a.seed,
                         quiet=True, run_name=f"Alpaca-llm-{Path(a.heads or 'heads').name}-{a.reward}-a{alpha:g}"),
                    caches)
        policies[alpha] = res["policy"].net
        policy_dev[alpha] = res["results"]["dev"]
        d = res["results"]["dev"]["consistentee"]
        print(f"alpha {alpha:g}: dev token agreement {100 * d['accuracy']:.1f}%  avg exit {d['avg_exit_layer']:.2f}/{L}")
    timings["policies"] = round(time.time() - t, 1)

    rows = alpaca_rows("eval")[: a.n_prompts]
    prompts = [prompt_ids(tok, r) for r in rows]
    refs = [r["output"] for r in rows]
    eos = eos_token_ids(tok)

    t = time.time()
    full = decode_all(model, heads, tok, prompts, FullDepth(), a.max_new_tokens, eos)
    # Hugging Face's own greedy generate, for the speed reference (same prompts and lengths)
    hf_tok, hf_s = 0, 0.0
    for pr in prompts:
        t1 = time.perf_counter()
        g = model.generate(torch.tensor([pr]), max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=eos,
                           pad_token_id=eos[0])
        hf_s += time.perf_counter() - t1
        hf_tok += g.shape[1] - len(pr)
    timings["full_depth_decode"] = round(time.time() - t, 1)

    def row(name, method, param, r):
        return {"name": name, "method": method, "param": param, "avg_exit_layer": r["avg_exit_layer"],
                "layer_speedup": L / r["avg_exit_layer"], "tokens_per_s": r["tokens_per_s"],
                "measured_speedup": r["tokens_per_s"] / full["tokens_per_s"],
                "rougeL_vs_full": rouge_l(r["texts"], full["texts"]), "rougeL_vs_reference": rouge_l(r["texts"], refs),
                "tokens": r["tokens"], "exit_hist": r["exit_hist"], "sample": r["texts"][0][:200]}

    results = [row("full depth", "full", None, full)]
    t = time.time()
    rules = [("consistentee", al, PolicyExit(net, name=f"consistentee-a{al:g}")) for al, net in policies.items()]
    rules += [("calm-softmax", th, SoftmaxResponse(th)) for th in _floats(a.softmax)]
    rules += [("calm-saturation", th, Saturation(th)) for th in _floats(a.saturation)]
    for method, param, rule in rules:
        r = row(rule.name, method, param, decode_all(model, heads, tok, prompts, rule, a.max_new_tokens, eos))
        results.append(r)
        print(f"{r['name']:<26} exit {r['avg_exit_layer']:5.2f}  x{r['layer_speedup']:.2f} layers  "
              f"x{r['measured_speedup']:.2f} measured  ROUGE-L full {r['rougeL_vs_full']:.3f} ref {r['rougeL_vs_reference']:.3f}")
    timings["early_exit_decode"] = round(time.time() - t, 1)

    summary = {"load": info, "n_prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "num_layers": L,
               "threads": a.threads, "full_tokens_per_s": full["tokens_per_s"],
               "hf_generate_tokens_per_s": hf_tok / max(hf_s, 1e-9), "timings_seconds": timings,
               "policy_dev": {str(k): v for k, v in policy_dev.items()}, "results": results, "args": vars(a)}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out_dir / "results.json")
    plot(results, out_dir / "rouge_vs_speedup.png")
    print_table(summary)
    return summary


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
    fig.savefig(path.with_suffix(".tmp.png"), dpi=110)
    os.replace(path.with_suffix(".tmp.png"), path)


def print_table(s: dict) -> None:
    print(f"\nfull depth: {s['full_tokens_per_s']:.1f} tokens/s (own loop), HF generate "
          f"{s['hf_generate_tokens_per_s']:.1f} tokens/s, {s['threads']} thread(s)")
    print(f"{'rule':<26} {'avg exit':>8} {'x layers':>8} {'tok/s':>6} {'x meas.':>7} {'R-L full':>8} {'R-L ref':>7}")
    for r in s["results"]:
        print(f"{r['name']:<26} {r['avg_exit_layer']:8.2f} {r['layer_speedup']:8.2f} {r['tokens_per_s']:6.1f} "
              f"{r['measured_speedup']:7.2f} {r['rougeL_vs_full']:8.3f} {r['rougeL_vs_reference']:7.3f}")


if __name__ == "__main__":
    main()
