"""Greedy decoding with token-level early exit on a decoder-only LLM, with the paper's state copying.

    python -m agents.llm.decode --rule policy --policy runs/reinforce/<run> --prompt "Name three colours."
    python -m agents.llm.decode --rule saturation --threshold 0.95 --prompt "..."

Every new token runs the decoder layers one at a time on the single new position (KV cache), for one
prompt (:func:`generate`) or a left-padded batch (:func:`generate_batch`). After layer l an exit rule
decides, row by row:

- ``policy``: ConsistentEE, a trained :class:`~agents.policies.net.LayerMLPPolicy` over the per-layer
  state; exit at the first layer with pi(exit | s_l) > 0.5 (the paper's inference rule).
- ``softmax``: CALM's softmax response, exit when the layer-l head's top-1 minus top-2 probability
  exceeds the threshold (costs one lm_head product per layer visited).
- ``saturation``: CALM's hidden-state saturation, exit when cos(s_l, s_{l-1}) exceeds the threshold.
- ``static``: always exit at a fixed layer; ``full``: never exit early.

The token is then the layer-t head's argmax (:class:`~backbones.llm.ExitHeads`). State copying: when a
token exits at layer t, its hidden state s_t stands in for layers t+1..L, so for each skipped layer j the
keys and values of this position are computed from s_t (layer j's input RMSNorm, k/v projections and
rotary embedding) and appended to layer j's KV cache; later tokens that reach layer j attend to them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from backbones.cli import UserError, parse, user_errors
from backbones.llm import ExitHeads, decoder_parts


# --------------------------------------------------------------------------- exit rules
class ExitRule:
    """Decide after 0-based layer ``l`` (never asked at the last layer) for a batch of rows that have not
    exited yet: ``decide(l, h [B, H], prev [B, H] | None, heads)`` returns (exit? bool [B], the layer-l
    head's logits [B, V] if the rule computed them, else None)."""

    name = "rule"

    def decide(self, l: int, h: torch.Tensor, prev: torch.Tensor | None, heads: ExitHeads):
        raise NotImplementedError


class FullDepth(ExitRule):
    name = "full"

    def decide(self, l, h, prev, heads):
        return torch.zeros(len(h), dtype=torch.bool), None


class StaticLayer(ExitRule):
    def __init__(self, layer: int) -> None:  # 1-based exit layer
        self.layer, self.name = int(layer), f"static-{layer}"

    def decide(self, l, h, prev, heads):
        return torch.full((len(h),), l + 1 >= self.layer), None


class PolicyExit(ExitRule):
    """ConsistentEE: exit when pi(exit | s_l) > threshold; states clipped to the env's observation bound."""

    def __init__(self, net, threshold: float = 0.5, obs_bound: float = 1000.0, name: str = "consistentee") -> None:
        self.net, self.threshold, self.bound, self.name = net.eval(), threshold, obs_bound, name
        if getattr(net, "features", "state") != "state":
            raise ValueError("token-level decoding supports policies over the state only (features='state')")

    def decide(self, l, h, prev, heads):
        s = h.float().clamp(-self.bound, self.bound)
        p = torch.sigmoid(self.net.logits(s, torch.full((len(s),), l)))
        return p.view(-1) > self.threshold, None


class SoftmaxResponse(ExitRule):
    """CALM softmax response: top-1 minus top-2 probability of the layer's head above ``threshold``."""

    def __init__(self, threshold: float, min_layer: int = 1) -> None:
        self.threshold, self.min_layer, self.name = threshold, min_layer, f"calm-softmax-{threshold:g}"

    def decide(self, l, h, prev, heads):
        if l + 1 < self.min_layer:
            return torch.zeros(len(h), dtype=torch.bool), None
        logits = heads.logits(h, l)
        top = torch.softmax(logits, -1).topk(2, dim=-1).values
        return top[:, 0] - top[:, 1] > self.threshold, logits


class Saturation(ExitRule):
    """CALM hidden-state saturation: cos(s_l, s_{l-1}) above ``threshold``."""

    def __init__(self, threshold: float, min_layer: int = 2) -> None:
        self.threshold, self.min_layer, self.name = threshold, min_layer, f"calm-saturation-{threshold:g}"

    def decide(self, l, h, prev, heads):
        if prev is None or l + 1 < self.min_layer:
            return torch.zeros(len(h), dtype=torch.bool), None
        return torch.nn.functional.cosine_similarity(h.float(), prev.float(), dim=-1) > self.threshold, None


# --------------------------------------------------------------------------- decoding
@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # 1-based, one per generated token
    seconds: float = 0.0  # token loop only (the prompt's prefill is excluded); shared by the rows of a batch

    @property
    def avg_exit_layer(self) -> float:
        return sum(self.exit_layers) / max(1, len(self.exit_layers))


def copy_state_kv(layers, h: torch.Tensor, t: int, position_embeddings, cache) -> None:
    """Append keys/values computed from the exit states ``h`` [B, 1, H] to the caches of layers t+1..L-1 (0-based t)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = position_embeddings
    for j in range(t + 1, len(layers)):
        attn = layers[j].self_attn
        x = layers[j].input_layernorm(h)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        cache.update(k, v, j)


@torch.no_grad()
def generate_batch(model, heads: ExitHeads, prompts: list[list[int]], rule: ExitRule | None = None,
                   max_new_tokens: int = 48, eos_ids: tuple[int, ...] | list[int] = (),
                   copy_states: bool = True) -> list[Generation]:
    """Greedy early-exit decoding of a batch of prompts (token ids, left-padded together). All but each
    prompt's last token are prefilled at full depth; from the last prompt token on, every position goes
    through the exit rule, row by row.

    A row that exits at layer t keeps s_t, and s_t is fed to the deeper layers that still run for the rows
    that have not exited: those layers then cache keys/values computed from s_t for it (state copying),
    and their output for it is discarded. Once every row has exited, the keys/values of the remaining
    layers are computed from the exit states (:func:`copy_state_kv`) and the layer loop stops, so a batch
    runs as deep as its deepest row. A row stops at an end-of-sequence token; the others go on.
    """
    from transformers import DynamicCache

    if not copy_states:
        raise NotImplementedError("decoding without state copying would leave holes in the KV cache")
    rule = rule or FullDepth()
    layers, _, _, rotary, embed = decoder_parts(model)
    L, B = len(layers), len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    if (lens < 1).any():
        raise ValueError("every prompt needs at least one token")
    T = int(lens.max())
    ids = torch.zeros((B, T), dtype=torch.long)
    kmask = torch.zeros((B, T), dtype=torch.bool)  # keys a row may attend to (False: left padding)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        kmask[i, T - len(p):] = True
    padded = not bool(kmask.all())
    cache = DynamicCache(config=model.config)
    if T > 1:
        model.model(input_ids=ids[:, :-1], attention_mask=kmask[:, :-1].long() if padded else None,
                    position_ids=(kmask[:, :-1].long().cumsum(1) - 1).clamp(min=0), past_key_values=cache,
                    use_cache=True)
    outs = [Generation() for _ in range(B)]
    tok, pos = ids[:, -1].clone(), lens - 1
    done = torch.zeros(B, dtype=torch.bool)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(max_new_tokens):
        attn = kmask[:, None, None, :] if padded else None  # bool, True = attend (one query per row)
        h = embed(tok.view(B, 1))
        position_ids = pos.view(B, 1)
        pe = rotary(h, position_ids)
        active = ~done
        exit_layer = torch.full((B,), L - 1)
        rule_logits: dict[int, torch.Tensor] = {}
        prev = None
        for l, layer in enumerate(layers):
            y = layer(h, attention_mask=attn, position_ids=position_ids, past_key_values=cache, use_cache=True,
                      position_embeddings=pe)
            h = y if bool(active.all()) else torch.where(active.view(B, 1, 1), y, h)
            if l == L - 1:
                break
            idx = active.nonzero().flatten()
            stop, logits = rule.decide(l, h[idx, -1], None if prev is None else prev[idx], heads)
            if bool(stop.any()):
                for k in stop.nonzero().flatten().tolist():
                    row = int(idx[k])
                    exit_layer[row] = l
                    if logits is not None:
                        rule_logits[row] = logits[k]
                active = active.clone()
                active[idx[stop]] = False
            if not bool(active.any()):
                copy_state_kv(layers, h, l, pe, cache)
                break
            prev = h[:, -1]
        # the next token of every row still generating (finished rows get a placeholder, never used)
        need = [i for i in (~done).nonzero().flatten().tolist() if i not in rule_logits]
        nxt = torch.zeros(B, dtype=torch.long)
        if need:
            nxt[need] = heads.logits(h[need, -1], exit_layer[need]).argmax(-1)
        for i, lg in rule_logits.items():
            nxt[i] = lg.argmax()
        for i in (~done).nonzero().flatten().tolist():
            outs[i].tokens.append(int(nxt[i]))
            outs[i].exit_layers.append(int(exit_layer[i]) + 1)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        tok, pos = nxt, pos + 1
        kmask = torch.cat([kmask, torch.ones((B, 1), dtype=torch.bool)], 1)
    secs = time.perf_counter() - t0
    for g in outs:
        g.seconds = secs
    return outs


def generate(model, heads: ExitHeads, prompt: list[int], rule: ExitRule | None = None, max_new_tokens: int = 48,
             eos_ids: tuple[int, ...] | list[int] = (), copy_states: bool = True) -> Generation:
    """Greedy early-exit decoding of one prompt (batch 1): :func:`generate_batch` of ``[prompt]``."""
    return generate_batch(model, heads, [prompt], rule, max_new_tokens, eos_ids, copy_states)[0]


def eos_token_ids(tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    vocab = tok.get_vocab()
    ids |= {vocab[s] for s in ("<|im_end|>", "<|endoftext|>") if s in vocab}
    return sorted(ids)


def make_rule(kind: str, threshold: float | None = None, policy: str | None = None, layer: int | None = None,
              obs_bound: float = 1000.0) -> ExitRule:
    if kind == "full":
        return FullDepth()
    if kind == "static":
        return StaticLayer(layer or 1)
    if kind == "softmax":
        return SoftmaxResponse(0.9 if threshold is None else threshold)
    if kind == "saturation":
        return Saturation(0.95 if threshold is None else threshold)
    if kind == "policy":
        from agents.policies.net import LayerMLPPolicy

        if not policy:
            raise UserError("--rule policy needs --policy <folder with policy.safetensors>")
        return PolicyExit(LayerMLPPolicy.load(policy), 0.5 if threshold is None else threshold, obs_bound)
    raise ValueError(f"unknown rule {kind!r}; expected full, static, softmax, saturation or policy")


@dataclass
class DecodeArgs:
    """Settings of ``python -m agents.llm.decode``; every field is a flag."""

    prompt: str
    """user message (formatted with the chat template)"""
    rule: Literal["full", "static", "softmax", "saturation", "policy"] = "full"
    """exit rule"""
    threshold: float | None = None
    """rule threshold; None: the rule's default (policy: pi > 0.5; softmax: top-1 minus top-2 probability > 0.9;
    saturation: cosine > 0.95)"""
    policy: str | None = None
    """policy folder (for --rule policy)"""
    layer: int | None = None
    """exit layer for --rule static (1-based); None: 1"""
    heads: str | None = None
    """exit-heads folder; None: runs/llm/heads"""
    model: str | None = None
    """HF causal-LM folder; None: the heads' LoRA-adapted model if any, else the SmolLM2 GGUF"""
    max_new_tokens: int = 48
    """tokens to generate"""
    threads: int = 1
    """torch threads"""


@user_errors
def main(argv: list[str] | None = None) -> None:
    from backbones.llm import default_heads_dir, heads_model, load_llm, prompt_ids

    a = parse(DecodeArgs, argv, __doc__)
    torch.set_num_threads(a.threads)
    rule = make_rule(a.rule, a.threshold, a.policy, a.layer)
    model, tok, _ = load_llm(heads_model(a.heads, a.model))
    heads = ExitHeads.load(a.heads or default_heads_dir(), model)
    g = generate(model, heads, prompt_ids(tok, {"instruction": a.prompt}), rule, a.max_new_tokens, eos_token_ids(tok))
    print(tok.decode(g.tokens, skip_special_tokens=True))
    print(f"\n{len(g.tokens)} tokens in {g.seconds:.2f} s ({len(g.tokens) / max(g.seconds, 1e-9):.1f} tokens/s), "
          f"avg exit layer {g.avg_exit_layer:.2f}/{model.config.num_hidden_layers}")


if __name__ == "__main__":
    main()
