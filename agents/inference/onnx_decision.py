"""The exit decision inside ONNX Runtime: each layer's graph also computes the observation and the policy's answer.

    dec = DecisionGraphs.for_policy(graphs, policy)   # None: this policy has no exportable decision
    hidden, log_probs, exits, *carry, *ctx = dec.first(input_ids, attention_mask, token_type_ids)
    hidden, log_probs, exits, *carry = dec.layer(l, hidden, attention_mask, ctx, carry)

Why: asking the policy in numpy after every layer costs 40-60 us per layer (the confidence features,
the MLP, Python between two ONNX Runtime calls); on a short input at batch 1 a MiniLM layer is
~0.6-0.9 ms, so that alone is 5-10% of what early exit saves. Here the decision is a small graph
(a learned decision written node by node by :func:`lean_graph`, a heuristic's :class:`DecisionModule`
exported with ``torch.onnx.export``; either is checked against the module) merged *in memory* with the
layer's graph (``onnx.compose.merge_models``), so one ONNX Runtime call per layer returns the layer's
log-probabilities and its exit decisions.

What a decision reads from earlier layers (the previous prediction, the patience count, the
previous max probability: the history features of :mod:`cee_env.observations`) is carried from
graph to graph as inputs and outputs (``carry``), as :class:`~agents.policies.stepper.Stepper`
carries it in numpy. Which policies export:

- a policy whose stepper describes its decision as a :class:`~agents.policies.stepper.DecisionSpec`
  (REINFORCE / FQI's :class:`~agents.policies.LearnedExit`, SB3's PPO / A2C / DQN with MLP policies),
  with any observation mode;
- the heuristics :class:`~agents.policies.heuristics.MaxProbExit`, ``EntropyExit`` and ``PatienceExit``.

Others (a custom policy, a policy that reads all layers at once, :class:`~agents.policies.StaticExit`,
which reads nothing) keep the numpy path.

At batch 1 the whole early exit is one graph (:func:`build_chain`, :meth:`DecisionGraphs.chain`): layer 1
and its decision, then each further layer inside the ``else`` branch of an ``If`` on the previous
decision, so one ONNX Runtime call runs exactly the layers the policy asks for and no Python runs
between them (one session instead of one call per layer; built in memory from the same checked
graphs on the first batch of one).

The decision graphs depend on the policy, not on the backbone's weights: they are exported once per
policy into ``<the checkpoint's export>/decide-<sha256[:16]>/`` where the hash is taken over what
the graphs are made from (the module's kind, observation mode, sizes, threshold and every weight),
with ``decide.json`` recording each file's sha256, checked on load (a mismatch is rebuilt). Each is
checked against the torch module it was exported from on a batch it was not traced on.

Numerics: the observation is computed in float32 here (float64 in numpy), so a decision can differ
from the numpy one only when its score lies within float32 rounding (~1e-6) of the threshold;
:mod:`benchmarks.inference_speed` counts exits that differ from the evaluator's on every timed instance.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones.files import claim, read_json, sha256_file, write_json
from cee_env.observations import N_CONFIDENCE, uses_states

__all__ = ["DecisionModule", "DecisionGraphs", "KnownExitChain", "decision_modules"]

FORMAT = 2  # 2: learned decisions written by lean_graph (1: torch.onnx.export of DecisionModule)
RECORD = "decide.json"
CARRY = ["prev_pred", "patience", "prev_max"]
_ACTS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": nn.functional.gelu, "identity": lambda x: x}


class DecisionModule(nn.Module):
    """The exit decision at 0-based layer ``l``: ``(pooled [B, H], log_probs [B, C], prev_pred [B] int64,
    patience [B], prev_max [B]) -> (exit [B] bool, score [B], pred, patience, max_prob)``.

    ``kind``: ``"spec"`` (an observation of ``mode`` through a :class:`~agents.policies.stepper.DecisionSpec`),
    ``"maxprob"`` (max probability > threshold), ``"entropy"`` (entropy in nats < threshold) or ``"patience"``
    (PABEE's counter >= threshold; 0: never). ``score`` is the quantity the rule thresholds (for checks).

    Written for a small graph (every node costs ~1 us at batch 1): no shape-dependent constants, and when
    the spec does not clip, the normalisation and the layer's one-hot are folded into the first linear
    layer (``((x - shift) / scale) @ W + b`` = ``x @ (W / scale) + (b - (shift / scale) @ W)``, the one-hot
    row of ``W`` added to the bias), which is then applied to each part of the observation separately
    instead of to their concatenation; equal up to float32 rounding."""

    def __init__(self, kind: str, l: int, num_layers: int, num_classes: int, threshold: float | None = None,
                 mode: str | None = None, bound: float = 50.0, spec=None) -> None:
        super().__init__()
        self.kind, self.l, self.L, self.C, self.mode = kind, int(l), int(num_layers), int(num_classes), mode
        self.bound = float(bound)
        self.threshold = None if threshold is None else float(threshold)
        self.head, self.exit_index, self.clip, self.folded, self.spec = None, 1, None, False, None
        self.acts: list[str] = []
        self.segments: list[tuple[str, int]] = []
        if kind == "spec":
            self._init_spec(spec)
        elif kind not in ("maxprob", "entropy", "patience"):
            raise ValueError(f"unknown decision kind {kind!r}")

    def _init_spec(self, spec) -> None:
        self.spec = spec  # (what :func:`lean_graph` writes the ONNX graph from; the buffers below hold the same)
        self.head, self.exit_index, self.clip = spec.head, int(spec.exit_index), spec.clip
        self.threshold = None if spec.threshold is None else float(spec.threshold)
        L, C, mode = self.L, self.C, self.mode
        w0 = np.asarray(spec.layers[0][0], np.float64)
        tail = {"state": [], "state_layer": [("onehot", L)], "state_probs": [("probs", C)],
                "confidence": [("conf", N_CONFIDENCE), ("onehot", L), ("probs", C)]}
        tail["state_confidence"] = tail["confidence"]
        segs = tail[mode]
        if uses_states(mode):
            segs = [("states", w0.shape[0] - sum(n for _, n in segs))] + segs
        self.segments = segs
        self.acts = [a for *_, a in spec.layers]
        for i, (w, b, _) in enumerate(spec.layers[1:], start=1):
            self.register_buffer(f"w{i}", torch.as_tensor(np.ascontiguousarray(w, np.float32)))
            self.register_buffer(f"b{i}", torch.as_tensor(np.asarray(b, np.float32)))
        b0 = np.asarray(spec.layers[0][1], np.float64)
        self.folded = spec.clip is None
        if not self.folded:  # normalise, clip, then the first layer on the concatenated observation
            for name, v in (("shift", spec.shift), ("scale", spec.scale)):
                self.register_buffer(name, None if v is None else torch.as_tensor(np.asarray(v, np.float32)))
            self.register_buffer("w0", torch.as_tensor(w0.astype(np.float32)))
            self.register_buffer("b0", torch.as_tensor(b0.astype(np.float32)))
            onehot = np.zeros((1, L), np.float32)
            onehot[0, self.l] = 1.0
            self.register_buffer("onehot", torch.as_tensor(onehot))
            return
        scale = np.ones(w0.shape[0]) if spec.scale is None else np.asarray(spec.scale, np.float64)
        shift = np.zeros(w0.shape[0]) if spec.shift is None else np.asarray(spec.shift, np.float64)
        w = w0 / scale[:, None]
        b = b0 - (shift / scale) @ w0
        off = 0
        for name, n in segs:
            if name == "onehot":
                b = b + w[off + self.l]
            else:
                self.register_buffer(f"w0_{name}", torch.as_tensor(w[off:off + n].astype(np.float32)))
            off += n
        self.register_buffer("b0", torch.as_tensor(b.astype(np.float32)))

    def config(self) -> dict:
        return {"kind": self.kind, "l": self.l, "L": self.L, "C": self.C, "threshold": self.threshold, "mode": self.mode,
                "bound": self.bound, "head": self.head, "exit_index": self.exit_index, "clip": self.clip,
                "acts": self.acts, "segments": self.segments, "folded": self.folded}

    def forward(self, pooled, log_probs, prev_pred, patience, prev_max):
        lp = log_probs.float()
        # the rules' scores in float64, as the evaluator computes them from the same float32 log-probabilities
        # (a threshold chosen from observed scores can equal one; float32 arithmetic could move it across)
        if self.kind == "maxprob":  # only what the rule reads; the history passes through unchanged
            score = torch.exp(lp.double().max(-1).values)
            return score > self.threshold, score, prev_pred, patience, prev_max
        if self.kind == "entropy":
            lp64 = lp.double()
            score = _entropy(torch.exp(lp64), lp64)
            return score < self.threshold, score, prev_pred, patience, prev_max
        p = torch.exp(lp)
        pred = torch.argmax(lp, dim=-1)
        if self.l > 0:
            agree = (pred == prev_pred).float()
            count = (patience + 1.0) * agree
        else:
            agree = count = lp[:, 0] * 0.0
        if self.kind == "patience":
            exit_ = (count >= self.threshold) if self.threshold > 0 else count < 0.0
            return exit_, count, pred, count, prev_max
        top2 = torch.topk(p, 2, dim=-1).values
        top1 = top2[:, 0]
        parts = {}
        if uses_states(self.mode):
            parts["states"] = torch.clamp(pooled.float(), -self.bound, self.bound)
        if any(n == "probs" for n, _ in self.segments):
            parts["probs"] = torch.clamp(p, 0.0, 1.0)
        if any(n == "conf" for n, _ in self.segments):
            prev = prev_max if self.l > 0 else top1 * 0.0
            ent = torch.clamp(_entropy(p, lp) * (1.0 / math.log(max(self.C, 2))), 0.0, 1.0)
            cols = [ent, agree, count * (1.0 / max(self.L - 1, 1)), prev.float()]
            parts["conf"] = torch.cat([top2] + [c.unsqueeze(-1) for c in cols], -1)
        if self.folded:
            x = self.b0
            for name, _ in self.segments:
                if name != "onehot":
                    x = x + parts[name] @ getattr(self, f"w0_{name}")
        else:
            parts["onehot"] = top1.unsqueeze(-1) * 0.0 + self.onehot
            x = torch.cat([parts[name] for name, _ in self.segments], -1) if len(self.segments) > 1 else \
                parts[self.segments[0][0]]
            if self.shift is not None:
                x = x - self.shift
            if self.scale is not None:
                x = x / self.scale
            x = torch.clamp(x, -self.clip, self.clip)
            x = x @ self.w0 + self.b0
        x = _ACTS[self.acts[0]](x)
        for i, act in enumerate(self.acts[1:], start=1):
            x = _ACTS[act](x @ getattr(self, f"w{i}") + getattr(self, f"b{i}"))
        e = self.exit_index
        if self.head == "sigmoid":
            score = torch.sigmoid(x[:, 0])
        elif self.head == "argmax":
            score = x[:, e] - x[:, 1 - e]
            return torch.argmax(x, dim=-1) == e, score, pred, count, top1
        elif self.head == "softmax":
            score = torch.softmax(x, -1)[:, e]
        else:  # qdiff
            score = torch.sigmoid(x[:, e] - x[:, 1 - e])
        return score > self.threshold, score, pred, count, top1


def _entropy(p, lp):
    """Entropy in nats; p = 0 counts 0 (lp clamped to a finite floor: 0 * -1e30 = 0 where 0 * -inf is NaN)."""
    return -(p * torch.clamp(lp, min=-1e30)).sum(-1)


def decision_modules(policy, num_layers: int, num_classes: int) -> list[DecisionModule] | None:
    """One :class:`DecisionModule` per layer but the last (which always exits) for ``policy``; None when its
    decision does not export (it then stays in numpy)."""
    from agents.policies.heuristics import EntropyExit, MaxProbExit, PatienceExit

    L, C = int(num_layers), int(num_classes)
    if C < 2 or L < 2:  # (one layer: nothing to decide)
        return None
    kinds = {MaxProbExit: ("maxprob", "threshold"), EntropyExit: ("entropy", "threshold"),
             PatienceExit: ("patience", "patience")}
    if type(policy) in kinds:
        kind, attr = kinds[type(policy)]
        return [DecisionModule(kind, l, L, C, float(getattr(policy, attr))) for l in range(L - 1)]
    make = getattr(policy, "stepper", None)
    stepper = make() if make is not None else None
    if stepper is None or getattr(stepper, "spec", None) is None or stepper.L != L:
        return None
    return [DecisionModule("spec", l, L, C, mode=stepper.mode, bound=stepper.bound, spec=stepper.spec(l))
            for l in range(L - 1)]


def fingerprint(modules: list[DecisionModule]) -> str:
    """sha256 over what the decision graphs are made from: format, each module's configuration and weights."""
    h = hashlib.sha256(f"decide-format-{FORMAT}".encode())
    for m in modules:
        h.update(json.dumps(m.config(), sort_keys=True).encode())
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the lean graph of a learned decision
def _logit(t: float) -> float:
    """The margin threshold equal to ``sigmoid(margin) > t``: -inf for t <= 0 (always), +inf for t >= 1 (never)."""
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t) - math.log1p(-t)


def lean_graph(m: DecisionModule):
    """The ONNX graph of a ``"spec"`` decision written node by node (a ModelProto), or None when the spec has a
    shape it does not cover (the module is then exported by ``torch.onnx.export``).

    Why: inside the batch-1 chain every node costs ~1 us, and a learned decision is evaluated after most
    layers; the exported module needs ~33 nodes (SB3 PPO, confidence observation), this 20 at layer 1 and
    26 after. What it saves, all exact in real arithmetic (equal up to float32 rounding):

    - the normalisation (and the feature scales: entropy / log C, patience / (L - 1)) is folded into the
      first layer's weights; the layer's one-hot and, at layer 1, the history features (constant 0) into its
      bias;
    - VecNormalize's clip is kept only for features whose range does not provably stay inside it (every
      confidence feature lies in [0, 1]; the states in +-bound), as one element-wise Max/Min pair on the
      observation with per-feature bounds;
    - the head compares a margin with a threshold instead of computing a probability:
      ``softmax(x)[e] > t`` <=> ``x_e - x_o > logit(t)`` (likewise ``sigmoid``, ``qdiff``; ``argmax``: the
      margin against 0), with the last layer reduced to that one margin column.

    ``score`` is that margin (:func:`_check` converts it to the module's score)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = m.spec
    if m.kind != "spec" or spec is None:
        return None
    layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64).reshape(-1), a) for w, b, a in spec.layers]
    if layers[-1][2] != "identity" or any(a not in ("tanh", "relu", "gelu", "identity") for *_, a in layers):
        return None
    out_dim = layers[-1][0].shape[1]
    if (m.head == "sigmoid") != (out_dim == 1) or out_dim > 2:
        return None
    L, C, l, e = m.L, m.C, m.l, m.exit_index
    w0, b0 = layers[0][0], layers[0][1].copy()
    D = w0.shape[0]
    shift = np.zeros(D) if spec.shift is None else np.asarray(spec.shift, np.float64).reshape(-1)
    scale = np.ones(D) if spec.scale is None else np.asarray(spec.scale, np.float64).reshape(-1)
    clip = None if spec.clip is None else float(spec.clip)
    log_c = math.log(max(C, 2))
    # the observation's features, in order: (graph column or None for a constant, factor a (feature = a * column
    # value), the feature's own range, the column's own clamp (None: none), constant value)
    feats: list[tuple] = []
    cols: list[tuple[str, int]] = []  # graph parts, concatenated in this order: (name, width)

    def add(part, width, a, lo, hi, own=None):
        cols.append((part, width))
        for j in range(width):
            feats.append(((part, j), a, lo, hi, own, None))

    def const(v):
        feats.append((None, 1.0, v, v, None, v))

    for name, n in m.segments:
        if name == "states":
            add("states", n, 1.0, -m.bound, m.bound, (-m.bound, m.bound))
        elif name == "probs":
            add("p", n, 1.0, 0.0, 1.0)
        elif name == "onehot":
            for j in range(n):
                const(1.0 if j == l else 0.0)
        else:  # conf: top1, top2, entropy / log C, agree, patience / (L - 1), previous max probability
            add("top", 2, 1.0, 0.0, 1.0)
            add("s", 1, -1.0 / log_c, 0.0, 1.0, (-log_c, 0.0))  # s = sum p log p, clamped: entropy in [0, 1]
            if l == 0:
                const(0.0), const(0.0), const(0.0)
            else:
                add("agree", 1, 1.0, 0.0, 1.0)
                add("count", 1, 1.0 / max(L - 1, 1), 0.0, 1.0)
                add("prev_max", 1, 1.0, 0.0, 1.0)
    if len(feats) != D:
        return None
    # fold: z_f = clip((a_f * col - shift_f) / scale_f); a feature that provably stays inside the clip is linear
    rows, lo_col, hi_col = [], [], []
    windowed = False  # does some feature need the clip's window (else: only the columns' own clamps)
    for f, (col, a, lo, hi, own, v) in enumerate(feats):
        if col is None:  # a constant: its normalised (and clipped) value goes to the bias
            z = (v - shift[f]) / scale[f]
            b0 += (z if clip is None else min(max(z, -clip), clip)) * w0[f]
            continue
        clo, chi = (-math.inf, math.inf) if own is None else own  # the column's own clamp, in column units
        if clip is not None:
            zl, zh = (lo - shift[f]) / scale[f], (hi - shift[f]) / scale[f]
            if not (zl >= -clip * (1 - 1e-6) and zh <= clip * (1 - 1e-6)):  # clamp the feature to the clip's window
                flo, fhi = sorted(((shift[f] - clip * scale[f]) / a, (shift[f] + clip * scale[f]) / a))
                rlo, rhi = sorted((lo / a, hi / a))  # the column's values (the feature's range, its own clamp)
                rlo, rhi = max(rlo, clo), min(rhi, chi)
                if flo > rhi or fhi < rlo:  # every value lies on one side of the window: the clip makes it constant
                    z = min(max(((rlo if fhi < rlo else rhi) * a - shift[f]) / scale[f], -clip), clip)
                    b0 += z * w0[f]
                    rows.append(np.zeros(w0.shape[1]))
                    lo_col.append(-math.inf), hi_col.append(math.inf)
                    continue
                clo, chi = max(clo, flo), min(chi, fhi)
                windowed = True
        rows.append(w0[f] * a / scale[f])
        b0 -= (shift[f] / scale[f]) * w0[f]
        lo_col.append(clo), hi_col.append(chi)
    w_first = np.stack(rows)
    mlp = [(w_first, b0, layers[0][2])] + layers[1:]
    wl, bl, _ = mlp[-1]
    if out_dim == 1:
        wm, bm = wl[:, 0], bl[0]
    else:
        wm, bm = wl[:, e] - wl[:, 1 - e], bl[e] - bl[1 - e]
    thr = 0.0 if m.head == "argmax" else _logit(float(m.threshold))
    compare = "GreaterOrEqual" if m.head == "argmax" and e == 0 else "Greater"  # argmax: the first on ties

    nodes, inits = [], []

    def c(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], **kw))
        return out

    FLOAT, INT = TensorProto.FLOAT, TensorProto.INT64
    conf = any(n == "conf" for n, _ in m.segments)
    inputs = [helper.make_tensor_value_info("log_probs", FLOAT, ["batch", C])]
    if uses_states(m.mode):
        inputs.insert(0, helper.make_tensor_value_info("pooled", FLOAT, ["batch", dict(cols)["states"]]))
    inputs += [helper.make_tensor_value_info("prev_pred", INT, ["batch"]),
               helper.make_tensor_value_info("patience", FLOAT, ["batch"]),
               helper.make_tensor_value_info("prev_max", FLOAT, ["batch"])]
    parts = {}
    if any(n in ("p", "top", "s") for n, _ in cols) or conf:
        parts["p"] = node("Exp", ["log_probs"], "p")
    if conf:
        node("TopK", ["p", c("k2", [2], np.int64)], "top", axis=1)  # (values; the indices are not read)
        nodes[-1].output.append("top_idx")
        parts["top"] = "top"
        lpf = node("Max", ["log_probs", c("lp_floor", -1e30)], "lp_f")  # 0 * log 0 counts 0
        parts["s"] = node("ReduceSum", [node("Mul", ["p", lpf], "plp"), c("ax1", [1], np.int64)], "s", keepdims=1)
        pred = node("ArgMax", ["log_probs"], "pred", axis=1, keepdims=0)
        top1 = node("Gather", ["top", c("i0", 0, np.int64)], "top1", axis=1)
        if l > 0:
            agree = node("Cast", [node("Equal", [pred, "prev_pred"], "eq")], "agree", to=FLOAT)
            count = node("Mul", [node("Add", ["patience", c("one", 1.0)], "pat1"), agree], "count")
            ax = c("ax1u", [1], np.int64)
            for name, src in (("agree", agree), ("count", count), ("prev_max", "prev_max")):
                parts[name] = node("Unsqueeze", [src, ax], f"{name}_2d")
        else:  # the history starts here
            count = node("Mul", ["patience", c("zero", 0.0)], "count")
        carry = [pred, count, top1]
    else:  # the history is not read: passed on unchanged
        carry = ["prev_pred", "patience", "prev_max"]
    if "states" in (n for n, _ in cols):
        parts["states"] = "pooled"
    if not windowed:  # each column's own clamp (entropy; states to +-bound) as a scalar Clip on its part
        for name in ("s", "states"):
            if name in parts:
                lo, hi = {"s": (-log_c, 0.0), "states": (-m.bound, m.bound)}[name]
                parts[name] = node("Clip", [parts[name], c(f"{name}_lo", lo), c(f"{name}_hi", hi)], f"{name}_c")
    x = parts[cols[0][0]] if len(cols) == 1 else node("Concat", [parts[n] for n, _ in cols], "obs", axis=1)
    if windowed:  # one element-wise clamp of the observation: each column's own range within the clip's window
        lo = np.array([max(v, -3.0e38) for v in lo_col], np.float32)
        hi = np.array([min(v, 3.0e38) for v in hi_col], np.float32)
        x = node("Min", [node("Max", [x, c("obs_lo", lo[None])], "obs_lo_c"), c("obs_hi", hi[None])], "obs_c")
    for i, (w, b, act) in enumerate(mlp[:-1]):
        x = node("Gemm", [x, c(f"w{i}", w), c(f"b{i}", b)], f"h{i}")
        x = _act_nodes(node, c, act, x, f"a{i}")
    margin = node("Add", [node("MatMul", [x, c("wm", wm)], "mm"), c("bm", bm)], "score")
    node(compare, [margin, c("thr", thr)], "exit")
    outs = [node("Identity", [src], f"{name}_out") for name, src in zip(CARRY, carry)]
    out_info = [helper.make_tensor_value_info("exit", TensorProto.BOOL, ["batch"]),
                helper.make_tensor_value_info("score", FLOAT, ["batch"]),
                helper.make_tensor_value_info(outs[0], INT, ["batch"]),
                helper.make_tensor_value_info(outs[1], FLOAT, ["batch"]),
                helper.make_tensor_value_info(outs[2], FLOAT, ["batch"])]
    from agents.inference.onnx_runtime import OPSET

    used = {i for nd in nodes for i in nd.input}
    graph = helper.make_graph(nodes, f"decide_{l}", [i for i in inputs if i.name in used], out_info, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def _act_nodes(node, c, act: str, x: str, tag: str) -> str:
    if act == "tanh":
        return node("Tanh", [x], tag)
    if act == "relu":
        return node("Relu", [x], tag)
    if act == "gelu":  # the erf form torch exports (ONNX Runtime fuses it into one Gelu)
        e = node("Erf", [node("Div", [x, c(f"{tag}_sqrt2", math.sqrt(2.0))], f"{tag}_d")], f"{tag}_e")
        return node("Mul", [node("Mul", [x, node("Add", [e, c(f"{tag}_one", 1.0)], f"{tag}_p")], f"{tag}_m"),
                            c(f"{tag}_half", 0.5)], tag)
    return x


# --------------------------------------------------------------------------- export and check
_IN = ["pooled", "log_probs", *CARRY]
_OUT = ["exit", "score", *(f"{c}_out" for c in CARRY)]


def _example(hidden: int, num_classes: int, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, generator=g) * 3
    return (torch.randn(batch, hidden, generator=g), torch.log_softmax(logits, -1),
            torch.randint(0, num_classes, (batch,), generator=g), torch.randint(0, 3, (batch,), generator=g).float(),
            torch.rand(batch, generator=g))


def _graph_name(l: int) -> str:
    return f"decide_{l}.onnx"


@torch.no_grad()
def export_decisions(modules: list[DecisionModule], hidden: int, folder: Path) -> dict[str, str]:
    from agents.inference.onnx_runtime import OPSET

    folder.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "batch"} for n in _IN + _OUT}
    import onnx

    lean = set()
    for m in modules:
        m.eval()
        model = lean_graph(m)
        if model is not None:
            onnx.checker.check_model(model)
            onnx.save(model, str(folder / _graph_name(m.l)))
            lean.add(m.l)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, _example(hidden, m.C, 2, 0), str(folder / _graph_name(m.l)), dynamo=False,
                              opset_version=OPSET, input_names=_IN, output_names=_OUT, dynamic_axes=axes)
    _check(modules, hidden, folder, lean)
    return {_graph_name(m.l): sha256_file(folder / _graph_name(m.l)) for m in modules}


@torch.no_grad()
def _check(modules: list[DecisionModule], hidden: int, folder: Path, lean: set[int] = frozenset()) -> None:
    """Each graph against its torch module on 64 rows it was not traced on: scores within 1e-4, and the same
    decisions wherever the score is not within 1e-4 of the threshold (a :func:`lean_graph`'s score, layers in
    ``lean``, is a margin: compared as the module's score, its sigmoid but for the argmax head)."""
    import onnxruntime as ort

    for m in modules:
        sess = ort.InferenceSession(str(folder / _graph_name(m.l)), providers=["CPUExecutionProvider"])
        ex = _example(hidden, m.C, 64, 1 + m.l)
        names = {i.name for i in sess.get_inputs()}
        got = sess.run(None, {k: v.numpy() for k, v in zip(_IN, ex) if k in names})
        want = [t.numpy() for t in m(*ex)]
        for name, a, b in zip(_OUT, got, want):
            if a.shape != b.shape:
                raise RuntimeError(f"the exported decision graph {_graph_name(m.l)} gives {name} of shape {a.shape}, "
                                   f"torch {b.shape}")
        score = got[1].astype(np.float64)
        if m.l in lean and m.head != "argmax":
            score = 1.0 / (1.0 + np.exp(-score))
        err = float(np.abs(score - want[1]).max())
        near = np.abs(want[1] - (m.threshold if m.threshold is not None else 0.0)) <= 1e-4
        history = m.kind == "patience" or any(n == "conf" for n, _ in m.segments)  # (else not carried on)
        if err > 1e-4 or (got[0] != want[0])[~near].any() or (history and (got[2] != want[2]).any()):
            raise RuntimeError(f"the exported decision graph {_graph_name(m.l)} differs from its torch module "
                               f"(largest score difference {err:.3g})")


def _usable(folder: Path, sha: str, names: list[str]) -> str | None:
    from agents.inference.onnx_runtime import record_problem

    return record_problem(folder, RECORD, [("format", FORMAT, "made from another format"),
                                           ("sha256", sha, "made from another policy")], lambda rec: names)


def ensure_decisions(export: Path, modules: list[DecisionModule], hidden: int) -> Path:
    """The checked decision graphs of ``modules`` under the backbone's export folder ``export`` (exported on
    first use, or again when they do not match their record)."""
    sha = fingerprint(modules)
    folder = Path(export) / f"decide-{sha[:16]}"
    names = [_graph_name(m.l) for m in modules]
    if _usable(folder, sha, names) is None:
        return folder
    with claim(folder, f"the ONNX decision graphs in {folder}"):
        if _usable(folder, sha, names) is None:
            return folder
        (folder / RECORD).unlink(missing_ok=True)
        files = export_decisions(modules, hidden, folder)
        write_json(folder / RECORD, {"format": FORMAT, "sha256": sha, "kind": modules[0].kind,
                                     "mode": modules[0].mode, "files": files}, indent=2)
    return folder


# --------------------------------------------------------------------------- sessions: layer + decision, merged
class DecisionGraphs:
    """Sessions of the backbone's first graph and layer graphs, each merged with that layer's decision graph (each
    made on its first use: at batch 1 only the chain is), and the chain for a batch of one."""

    def __init__(self, graphs, folder: Path) -> None:
        self.folder, self.num_layers, self.graphs = Path(folder), graphs.num_layers, graphs
        self._sessions: dict[int, tuple] = {}  # layer -> (session, its input names)
        self._chain = None
        carry_out = [f"d_{c}_out" for c in CARRY]
        self._first_out = ["hidden_out", "log_probs", *graphs.ctx_names, "d_exit", *carry_out]
        self._layer_out = ["hidden_out", "log_probs", "d_exit", *carry_out]

    def _session(self, l: int) -> tuple:
        if l not in self._sessions:
            import onnxruntime as ort

            m = _merged(self.graphs, self.folder, "first.onnx" if l == 0 else f"layer_{l}.onnx", l)
            sess = ort.InferenceSession(m.SerializeToString(), sess_options=self.graphs.session_options(),
                                        providers=["CPUExecutionProvider"])
            self._sessions[l] = (sess, {i.name for i in sess.get_inputs()})
        return self._sessions[l]

    @classmethod
    def for_policy(cls, graphs, policy, num_classes: int, hidden: int) -> "DecisionGraphs | None":
        mods = decision_modules(policy, graphs.num_layers, num_classes)
        if mods is None:
            return None
        return cls(graphs, ensure_decisions(graphs.folder, mods, hidden))

    @staticmethod
    def _no_history(names, b: int) -> dict[str, np.ndarray]:
        """The history inputs of a first graph (those it kept) for ``b`` rows: zeros (layer 1 reads no history)."""
        zeros = {"d_prev_pred": np.zeros(b, np.int64), "d_patience": np.zeros(b, np.float32),
                 "d_prev_max": np.zeros(b, np.float32)}
        return {k: v for k, v in zeros.items() if k in names}

    def _first_feed(self, names, input_ids, attention_mask, token_type_ids) -> dict[str, np.ndarray]:
        feed = self.graphs._feed(names, input_ids, attention_mask, token_type_ids)
        feed.update(self._no_history(names, input_ids.shape[0]))
        return feed

    def first(self, input_ids, attention_mask, token_type_ids=None) -> list[np.ndarray]:
        """[hidden, log_probs, *ctx, exit, prev_pred, patience, prev_max] after embeddings, layer 1 and its decision."""
        sess, names = self._session(0)
        return sess.run(self._first_out, self._first_feed(names, input_ids, attention_mask, token_type_ids))

    def chain(self, input_ids, attention_mask, token_type_ids=None) -> tuple[np.ndarray, int]:
        """A batch of one through the whole early exit in one call (:func:`build_chain`, built on first use):
        (log_probs [1, C], exit layer, 1-based)."""
        if self._chain is None:
            import onnxruntime as ort

            model = build_chain(self.graphs, self.folder, self.num_layers)
            self._chain = ort.InferenceSession(model.SerializeToString(), sess_options=self.graphs.session_options(),
                                               providers=["CPUExecutionProvider"])
            self._chain_in = names = {i.name for i in self._chain.get_inputs()}
            # what every call feeds alike (the history's zeros: the graphs never write their inputs), made once:
            # at batch 1 the Python around the call is a measurable share of a short input's time
            self._chain_fixed = self._no_history(names, 1)
            self._chain_tt = "token_type_ids" in names
            self._chain_names = None if {"input_ids", "attention_mask"} <= names else names
            self._chain_out = [o.name for o in self._chain.get_outputs()]
        feed = dict(self._chain_fixed, input_ids=input_ids, attention_mask=attention_mask)
        if self._chain_tt:
            feed["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        if self._chain_names is not None:  # (a graph that does not read one of them)
            feed = {k: v for k, v in feed.items() if k in self._chain_names}
        logp, layer = self._chain.run(self._chain_out, feed)
        return logp, int(layer)

    def layer(self, l: int, hidden, attention_mask, ctx, carry) -> list[np.ndarray]:
        """Layer ``l`` (1 <= l < L - 1) with its decision: [hidden, log_probs, exit, prev_pred, patience, prev_max]."""
        feed = {"hidden": hidden, "attention_mask": attention_mask, **dict(zip(self.graphs.ctx_names, ctx)),
                **{f"d_{c}": v for c, v in zip(CARRY, carry)}}
        sess, names = self._session(l)
        return sess.run(self._layer_out, {k: v for k, v in feed.items() if k in names})


# --------------------------------------------------------------------------- batch 1: the whole early exit as one graph
def _merged(graphs, folder: Path, base: str, l: int):
    """The backbone graph ``base`` merged with decision graph ``l`` (a ModelProto): the decision reads the
    layer's pooled state and log-probabilities; the pooled state is not an output."""
    import onnx
    from onnx import compose

    m1 = onnx.load(str(graphs.folder / base))
    m2 = onnx.load(str(Path(folder) / _graph_name(l)))
    outs = [o.name for o in m1.graph.output if o.name != "pooled"]
    m2_in = {i.name for i in m2.graph.input}
    io = [(n, n) for n in ("pooled", "log_probs") if n in m2_in]
    return compose.merge_models(m1, m2, io_map=io, prefix2="d_",
                                outputs=outs + ["d_exit"] + [f"d_{c}_out" for c in CARRY])


def build_chain(graphs, folder: Path | None, num_layers: int, known: bool = False):
    """One graph for a batch of one: layer 1 and its decision, then each further layer inside the ``else`` branch
    of an ``If`` on the previous decision -> ``(log_probs [1, C], exit_layer [] int64)``. Each layer's weights
    live in its own branch (ONNX Runtime prepacks a branch's own initializers; read from the outer scope
    they made the chain slower than per-layer calls in a probe).

    ``known=True``: the same chain with no decision graphs (``folder`` unused) and the exit layer given as an
    input (``exit_at`` [1] int64, 1-based): the early exit as it would run if deciding cost nothing, the
    reference :mod:`benchmarks.inference_speed` measures the decisions' cost against."""
    import onnx
    from onnx import TensorProto, compose, helper

    L = num_layers

    def layer_model(base: str, l: int):
        if known or l == L - 1:
            return onnx.load(str(graphs.folder / base))
        return _merged(graphs, folder, base, l)

    top = layer_model("first.onnx", 0)
    ctx = list(graphs.ctx_names)

    def outputs(tag):
        return [helper.make_tensor_value_info(f"{tag}_log_probs", TensorProto.FLOAT, None),
                helper.make_tensor_value_info(f"{tag}_exit_layer", TensorProto.INT64, None)]

    def done(tag, log_probs, layer):  # the branch that returns layer ``layer``'s output
        return helper.make_graph(
            [helper.make_node("Identity", [log_probs], [f"{tag}_log_probs"]),
             helper.make_node("Constant", [], [f"{tag}_exit_layer"],
                              value=helper.make_tensor(f"{tag}_k", TensorProto.INT64, [], [layer]))],
            tag, [], outputs(tag))

    def decide(exit_name, log_probs, l, tag):  # If(exit) then layer l + 1's output else the next layer
        nodes = []  # (If reads its one-element condition [1] as it is)
        if known:  # exit here iff exit_at == l + 1
            exit_name = f"{tag}_known"
            nodes.append(helper.make_node("Equal", ["exit_at", f"chain_layer_{l + 1}"], [exit_name]))
        return nodes + [
            helper.make_node("If", [exit_name], [f"{tag}_log_probs", f"{tag}_exit_layer"],
                             then_branch=done(f"{tag}_t", log_probs, l + 1), else_branch=branch(l + 1, tag))]

    prev = {"hidden": "hidden_out", **{f"d_{c}": f"d_{c}_out" for c in CARRY}}

    def branch(l, parent):
        p = f"c{l}_"
        m = compose.add_prefix(layer_model(f"layer_{l}.onnx", l), p)
        src = {"hidden": prev_names[l]["hidden"], "attention_mask": "attention_mask", **{c: c for c in ctx},
               **{f"d_{c}": prev_names[l][f"d_{c}"] for c in CARRY}}
        binds = [helper.make_node("Identity", [src[i.name[len(p):]]], [i.name]) for i in m.graph.input]
        tag = f"{parent}_e"
        nodes = binds + list(m.graph.node)
        if l < L - 1:
            nodes += decide(f"{p}d_exit", f"{p}log_probs", l, tag)
        else:
            nodes += [helper.make_node("Identity", [f"{p}log_probs"], [f"{tag}_log_probs"]),
                      helper.make_node("Constant", [], [f"{tag}_exit_layer"],
                                       value=helper.make_tensor(f"{tag}_k", TensorProto.INT64, [], [L]))]
        return helper.make_graph(nodes, tag, [], outputs(tag), initializer=list(m.graph.initializer))

    prev_names = {1: prev}
    for l in range(2, L):
        prev_names[l] = {"hidden": f"c{l - 1}_hidden_out", **{f"d_{c}": f"c{l - 1}_d_{c}_out" for c in CARRY}}
    nodes = list(top.graph.node) + decide("d_exit", "log_probs", 0, "chain")
    inits = list(top.graph.initializer)
    inputs = list(top.graph.input)
    if known:
        inits += [onnx.numpy_helper.from_array(np.array([k], dtype=np.int64), f"chain_layer_{k}") for k in range(1, L)]
        inputs.append(helper.make_tensor_value_info("exit_at", TensorProto.INT64, [1]))
    graph = helper.make_graph(nodes, "early_exit_chain", inputs, outputs("chain"), initializer=inits)
    model = helper.make_model(graph, opset_imports=top.opset_import)
    model.ir_version = top.ir_version
    return model


class KnownExitChain:
    """A batch of one through the chain of :func:`build_chain` ``(known=True)``: the layers up to a given exit
    layer, each with its pooling and classifier, no decision (what early exit would cost if deciding were
    free). ``run(exit_at, input_ids, attention_mask, token_type_ids) -> (log_probs [1, C], exit layer)``."""

    def __init__(self, graphs) -> None:
        import onnxruntime as ort

        self.graphs, self.num_layers = graphs, graphs.num_layers
        self._sess = ort.InferenceSession(build_chain(graphs, None, graphs.num_layers, known=True).SerializeToString(),
                                          sess_options=graphs.session_options(), providers=["CPUExecutionProvider"])
        self._in = {i.name for i in self._sess.get_inputs()}

    def run(self, exit_at: int, input_ids, attention_mask, token_type_ids=None) -> tuple[np.ndarray, int]:
        if input_ids.shape[0] != 1 or not 1 <= int(exit_at) <= self.num_layers:
            raise ValueError(f"a batch of one and an exit layer in 1..{self.num_layers}; got {input_ids.shape[0]} "
                             f"rows, exit layer {exit_at}")
        feed = self.graphs._feed(self._in, input_ids, attention_mask, token_type_ids)
        feed["exit_at"] = np.array([int(exit_at)], dtype=np.int64)
        logp, layer = self._sess.run(None, feed)
        return logp, int(layer)
