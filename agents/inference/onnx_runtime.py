"""Early-exit inference in ONNX Runtime: one graph per layer, rows leaving the batch as in PyTorch.

    clf = OnnxEarlyExitClassifier.from_checkpoint(ckpt_dir, policy, threads=1)   # export cached under runs/onnx
    clf = EarlyExitClassifier.from_run(run_dir, runtime="onnx")                    # the same through the base class
    res = clf.predict(texts, batch_size=32)                                        # PredictResult, as in PyTorch
    logp = clf.graphs.full_depth(input_ids, attention_mask)                        # the whole model in one graph

Why: on short inputs Python and framework overhead per layer is a large share of PyTorch eager's
time, so the optimised full-depth runtime a user already has (the whole model exported to ONNX
Runtime) beats early exit in PyTorch. Here every piece the early-exit loop calls runs in ONNX
Runtime, one :class:`onnxruntime.InferenceSession` per graph:

- ``first.onnx``: ``(input_ids, attention_mask[, token_type_ids]) -> (hidden, ctx..., pooled, log_probs)``:
  the family's embeddings, the layers' context (attention mask; MPNet's relative position bias,
  Llama's rotary positions and causal mask) and layer 1 with its exit, in one call;
- ``layer_<l>.onnx``: ``(hidden, attention_mask, ctx...) -> (hidden, pooled, log_probs)``: layer ``l``,
  pooling and the internal classifier; the context is an input (made once per batch), not rebuilt
  in every layer's graph;
- ``context.onnx``: ``(hidden, attention_mask) -> ctx...``: the context again, after rows leave the batch
  (never called at batch 1);
- ``full.onnx``: the whole full-depth model (embeddings, all layers, last classifier) -> log_probs:
  the fastest full-depth option, the reference early exit is timed against.

The context is whatever the family's :meth:`~backbones.families.Family.context` returns (a tensor or a
tuple of tensors), passed between graphs as its tensor leaves ``ctx_0, ctx_1, ...`` in pytree order;
which of their axes are dynamic is read off two traces of different batch and sequence sizes.

Batch and sequence axes are dynamic. The exit decision runs inside each layer's graph
(``decisions="graph"``, :mod:`agents.inference.onnx_decision`: a learned policy's observation and MLP,
or a heuristic's score, as graph nodes, the history carried between graphs); policies whose decision
does not export are asked in numpy after each layer (``decisions="numpy"`` for all). With the
decisions in the graphs, a batch of one is a single call of a graph holding every layer, each further
one inside an ``If`` on the previous decision (``chain``; False: one call per layer). The
row bookkeeping (:meth:`EarlyExitClassifier.exit_loop`) is shared with the PyTorch path, so exits
equal the PyTorch path's and the evaluator's unless a score lies within float rounding (~1e-6) of a
threshold.

Graphs are exported with the TorchScript-based ``torch.onnx.export`` (``dynamo=False``: it needs
no onnxscript and traces these models with dynamic axes), checked once against PyTorch on a
second batch of another shape (a shape baked into a graph would be caught there), and cached in
``runs/onnx/<checkpoint>-<weights sha256[:16]>/`` with ``onnx.json``: the sha256 of the checkpoint
weights they were made from and of every ``.onnx`` file, checked on load; a mismatching or
incomplete export is rebuilt (it is derived data, like the layer caches).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agents.inference.early_exit_model import EarlyExitClassifier, full_depth_logits
from agents.policies import StaticExit
from backbones.files import claim, read_json, sha256_file, stored_path, write_json

__all__ = ["OnnxGraphs", "OnnxEarlyExitClassifier", "export_graphs", "ensure_export", "export_folder", "DECISIONS"]

FORMAT = 2  # 2: the context is a graph input (first/context graphs); 1: rebuilt inside every layer graph
RECORD = "onnx.json"
DECISIONS = ("graph", "numpy")  # where the exit decision runs (OnnxEarlyExitClassifier(decisions=...))
OPSET = 17
EXPORT_ATOL = 1e-4  # an exported graph must reproduce PyTorch within this on a batch it was not traced on


# --------------------------------------------------------------------------- the graphs, as torch modules
def _ctx_leaves(ctx) -> tuple[list[torch.Tensor], object]:
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(ctx)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise RuntimeError(f"the layers' context holds non-tensor values ({spec}); this family does not export")
    return leaves, spec


class _Embed(nn.Module):
    """Embeddings and the layers' context (as tensor leaves)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden, ctx = self.model.embed(input_ids, attention_mask, token_type_ids)
        return (hidden, *_ctx_leaves(ctx)[0])


class _Context(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden, attention_mask):
        return tuple(_ctx_leaves(self.model.layer_mask(hidden, attention_mask))[0])


class _Layer(nn.Module):
    """One layer and its exit; the context comes in as its leaves (``spec``: their pytree structure)."""

    def __init__(self, model, l: int, spec) -> None:
        super().__init__()
        self.model, self.l, self.spec = model, l, spec

    def forward(self, hidden, attention_mask, *ctx):
        from torch.utils._pytree import tree_unflatten

        m = self.model
        hidden = m.run_layer(self.l, hidden, tree_unflatten(list(ctx), self.spec))
        pooled = m.pool(hidden, attention_mask)
        return hidden, pooled.float(), torch.log_softmax(m.classify(self.l, pooled).float(), -1)


class _First(nn.Module):
    """Embeddings, context and layer 1 with its exit: the first call of every batch."""

    def __init__(self, model, spec) -> None:
        super().__init__()
        self.embed, self.layer = _Embed(model), _Layer(model, 0, spec)

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden, *ctx = self.embed(input_ids, attention_mask, token_type_ids)
        return (*self.layer(hidden, attention_mask, *ctx), *ctx)


class _Full(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return torch.log_softmax(full_depth_logits(self.model, input_ids, attention_mask, token_type_ids).float(), -1)


_BT = {0: "batch", 1: "seq"}
_B = {0: "batch"}


def _example(model, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids with ragged right padding (the last row shorter), so masks are traced as masks."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.encoder.config, "vocab_size", 100))
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, max(1, seq // 2):] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    module.eval()  # (export restores the module's mode afterwards, recursively: a train-mode wrapper would
    #                 leave the model in train mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes, checked below
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes={k: v for k, v in axes.items() if k in inputs + outputs})


def graph_names(num_layers: int) -> list[str]:
    return ["first.onnx", "context.onnx", *(f"layer_{l}.onnx" for l in range(num_layers)), "full.onnx"]


def _ctx_axes(model, leaves: list[torch.Tensor]) -> tuple[list[str], dict]:
    """The names of the context's leaves (traced on 2 x 9 tokens) and their dynamic axes: the axes whose size
    differs in a trace of 3 x 13 tokens."""
    ex = _example(model, 3, 13, 0)
    other = _ctx_leaves(model.embed(ex["input_ids"], ex["attention_mask"], ex["token_type_ids"])[1])[0]
    if len(other) != len(leaves) or any(a.dim() != b.dim() for a, b in zip(leaves, other)):
        raise RuntimeError("the layers' context changes structure with the batch shape; this family does not export")
    names = [f"ctx_{i}" for i in range(len(leaves))]
    axes = {n: {d: f"{n}_d{d}" for d, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y}
            for n, a, b in zip(names, leaves, other)}
    return names, axes


@torch.inference_mode(False)
@torch.no_grad()
def export_graphs(model, folder: str | os.PathLike) -> dict[str, str]:
    """Export ``model`` (a :class:`~backbones.multiexit.MultiExitEncoder`) into ``folder`` and check each graph
    against PyTorch on a batch of another shape; returns ``{file name: sha256}``. Raises ``RuntimeError`` if
    a graph does not reproduce PyTorch (within :data:`EXPORT_ATOL`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        ex = _example(model, 2, 9, 0)
        hidden, ctx = model.embed(ex["input_ids"], ex["attention_mask"], ex["token_type_ids"])
        leaves, spec = _ctx_leaves(ctx)
        ctx_names, ctx_axes = _ctx_axes(model, leaves)
        axes = {"input_ids": _BT, "attention_mask": _BT, "token_type_ids": _BT, "hidden": _BT,
                "hidden_out": _BT, "pooled": _B, "log_probs": _B, **ctx_axes}
        tok_in = ["input_ids", "attention_mask", "token_type_ids"]
        tok_args = (ex["input_ids"], ex["attention_mask"], ex["token_type_ids"])
        layer_out = ["hidden_out", "pooled", "log_probs"]
        _export(_First(model, spec), tok_args, folder / "first.onnx", tok_in, layer_out + ctx_names, axes)
        _export(_Context(model), (hidden, ex["attention_mask"]), folder / "context.onnx", ["hidden", "attention_mask"],
                ctx_names, axes)
        for l in range(model.num_layers):
            _export(_Layer(model, l, spec), (hidden, ex["attention_mask"], *leaves), folder / f"layer_{l}.onnx",
                    ["hidden", "attention_mask", *ctx_names], layer_out, axes)
        _export(_Full(model), tok_args, folder / "full.onnx", tok_in, ["log_probs"], axes)
        _check_export(model, folder)
    finally:
        model.train(was_training)
    return {name: sha256_file(folder / name) for name in graph_names(model.num_layers)}


def _check_export(model, folder: Path) -> None:
    """Each graph against PyTorch on a batch of a shape it was not traced on (4 rows, 11 tokens)."""
    g = OnnxGraphs(folder, model.num_layers, threads=1)
    ex = _example(model, 4, 11, 1)
    real = ex["attention_mask"].bool().numpy()
    hidden, ctx = model.embed(ex["input_ids"], ex["attention_mask"], ex["token_type_ids"])
    leaves, spec = _ctx_leaves(ctx)
    np_in = {k: v.numpy() for k, v in ex.items()}
    first = g.first(np_in["input_ids"], np_in["attention_mask"], np_in["token_type_ids"])
    pairs = [("first.onnx", a, b.float().numpy()) for a, b in zip(first[3:], leaves)]
    pairs += [("context.onnx", a, b.float().numpy()) for a, b in zip(g.context(hidden.numpy(), np_in["attention_mask"]),
                                                                     leaves)]
    h = hidden
    for l in range(model.num_layers):
        want = _Layer(model, l, spec).eval()(h, ex["attention_mask"], *leaves)
        out = g.layer(l, h.numpy(), np_in["attention_mask"], [x.numpy() for x in leaves])
        runs = [(f"layer_{l}.onnx", out)] + ([("first.onnx", first[:3])] if l == 0 else [])
        for name, o in runs:
            pairs += [(name, o[0][real], want[0].numpy()[real]), (name, o[1], want[1].numpy()),
                      (name, o[2], want[2].numpy())]
        h = want[0]
    want = _Full(model).eval()(ex["input_ids"], ex["attention_mask"], ex["token_type_ids"])
    pairs.append(("full.onnx", g.full_depth(np_in["input_ids"], np_in["attention_mask"], np_in["token_type_ids"]),
                  want.numpy()))
    for name, a, b in pairs:
        a = np.asarray(a, dtype=np.float32)
        if a.shape != b.shape:
            raise RuntimeError(f"the exported {name} gives shape {a.shape} where PyTorch gives {b.shape} on a batch "
                               f"of another shape (4 x 11); this architecture does not export with dynamic axes")
        err = float(np.abs(a - b).max()) if a.size else 0.0
        if not err <= EXPORT_ATOL * max(1.0, float(np.abs(b).max())):
            raise RuntimeError(f"the exported {name} differs from PyTorch by {err:.3g} on a batch of another shape "
                               f"(4 x 11); this architecture does not export with dynamic axes")


# --------------------------------------------------------------------------- sessions
class OnnxGraphs:
    """The exported graphs of one model, one ONNX Runtime session each (``threads`` intra-op threads; None:
    ONNX Runtime's default, all physical cores)."""

    def __init__(self, folder: str | os.PathLike, num_layers: int, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.folder, self.num_layers, self.threads = Path(folder), num_layers, threads
        opts = self.session_options()

        def session(name):
            return ort.InferenceSession(str(self.folder / name), sess_options=opts, providers=["CPUExecutionProvider"])

        self._first = session("first.onnx")
        self._context = session("context.onnx")
        self._layers = [session(f"layer_{l}.onnx") for l in range(num_layers)]
        self._full = session("full.onnx")
        self._first_in = {i.name for i in self._first.get_inputs()}
        self._full_in = {i.name for i in self._full.get_inputs()}
        self.ctx_names = [o.name for o in self._context.get_outputs()]
        self._layer_in = [{i.name for i in s.get_inputs()} for s in self._layers]

    def session_options(self):
        """ONNX Runtime's options for every session of this model: all graph optimisations, ``threads``."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        opts.log_severity_level = 3
        return opts

    @staticmethod
    def _feed(names: set[str], input_ids, attention_mask, token_type_ids) -> dict[str, np.ndarray]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in names:  # what BERT's embeddings do without token types: zeros
            feed["token_type_ids"] = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
        return {k: v for k, v in feed.items() if k in names}

    def first(self, input_ids, attention_mask, token_type_ids=None) -> list[np.ndarray]:
        """Embeddings, context and layer 1 with its exit in one call: [hidden, pooled, log_probs, *ctx]."""
        return self._first.run(None, self._feed(self._first_in, input_ids, attention_mask, token_type_ids))

    def context(self, hidden: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
        """The layers' context for these rows (after rows left the batch)."""
        return self._context.run(None, {"hidden": hidden, "attention_mask": attention_mask})

    def layer(self, l: int, hidden: np.ndarray, attention_mask: np.ndarray, ctx: list[np.ndarray]) -> list[np.ndarray]:
        """Layer ``l`` (0-based) and its exit: [hidden, pooled, log_probs]."""
        feed = {"hidden": hidden, "attention_mask": attention_mask, **dict(zip(self.ctx_names, ctx))}
        return self._layers[l].run(None, {k: v for k, v in feed.items() if k in self._layer_in[l]})

    def full_depth(self, input_ids, attention_mask, token_type_ids=None) -> np.ndarray:
        """The whole full-depth model in one graph: log-probs of the last classifier [B, C]."""
        return self._full.run(None, self._feed(self._full_in, input_ids, attention_mask, token_type_ids))[0]


# --------------------------------------------------------------------------- the cached export of a checkpoint
def export_folder(checkpoint: str | os.PathLike, weights_sha: str) -> Path:
    from backbones.paths import runs_dir

    return runs_dir() / "onnx" / f"{Path(checkpoint).name}-{weights_sha[:16]}"


def record_problem(folder: Path, record: str, checks, names) -> str | None:
    """Why the files the JSON ``record`` in ``folder`` lists (``{"files": {name: sha256}}``) cannot be used
    (None: they can): no or unreadable record, a failed check (``checks``: ``(field, expected value, why)``),
    a file list other than ``names(record's dict)`` (None: not a list of them), a listed file missing or
    not matching its sha256. Shared by the backbone's export and the decision graphs."""
    if not (folder / record).is_file():
        return "no record"
    try:
        rec = read_json(folder / record, "")
    except ValueError as e:
        return str(e)
    for field, want, why in checks:
        if rec.get(field) != want:
            return why.format(got=rec.get(field))
    files = rec.get("files", {})
    want_names = names(rec)
    if want_names is None or sorted(files) != sorted(want_names):
        return f"{record} does not list the graphs it should"
    for name, sha in files.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if sha256_file(folder / name) != sha:
            return f"{name} does not match the sha256 in {record} (corrupt or modified)"
    return None


def _usable(folder: Path, weights_sha: str) -> str | None:
    """Why the export in ``folder`` cannot be used (None: it can)."""
    return record_problem(folder, RECORD, [("format", FORMAT, f"format {{got}} != {FORMAT}"),
                                           ("weights_sha256", weights_sha, "made from other checkpoint weights")],
                          lambda rec: graph_names(rec["num_layers"]) if isinstance(rec.get("num_layers"), int)
                          else None)


def ensure_export(checkpoint: str | os.PathLike, model=None, rebuild: bool = False, quiet: bool = False) -> Path:
    """The checked ONNX export of a checkpoint, exported on first use (or again when the cached one does not
    match its record or the checkpoint's weights).

    The checkpoint's weights are checked against the sha256 its multiexit.json records (a modified
    checkpoint is refused: :class:`~backbones.files.IntegrityError`); ``model`` is the loaded checkpoint,
    if the caller has it."""
    from backbones.multiexit import MultiExitEncoder, read_config, weights_sha256

    ckpt = Path(checkpoint)
    sha = weights_sha256(ckpt)
    folder = export_folder(ckpt, sha)
    if not rebuild and _usable(folder, sha) is None:
        return folder
    with claim(folder, f"the ONNX export of {ckpt}"):  # a second process waits, then uses it
        why = "rebuild asked" if rebuild else _usable(folder, sha)
        if why is None:
            return folder
        model = model if model is not None else MultiExitEncoder.load(ckpt)
        if not quiet:
            print(f"exporting {ckpt} to ONNX ({model.num_layers} layers) -> {folder}"
                  + ("" if why == "no record" else f" (the export there is unusable: {why})"), file=sys.stderr)
        (folder / RECORD).unlink(missing_ok=True)  # no record while the graphs are being replaced
        files = export_graphs(model, folder)
        import onnxruntime

        write_json(folder / RECORD, {
            "format": FORMAT, "checkpoint": stored_path(ckpt), "weights_sha256": sha,
            "num_layers": model.num_layers, "pooling": read_config(ckpt)["pooling"], "opset": OPSET,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "files": files}, indent=2)
    return folder


def load_graphs(checkpoint: str | os.PathLike, model=None, threads: int | None = None,
                rebuild: bool = False) -> OnnxGraphs:
    """Sessions over the checked export of ``checkpoint`` (exported first if needed)."""
    folder = ensure_export(checkpoint, model, rebuild)
    return OnnxGraphs(folder, int(json.loads((folder / RECORD).read_text())["num_layers"]), threads)


# --------------------------------------------------------------------------- the classifier
class OnnxEarlyExitClassifier(EarlyExitClassifier):
    """:class:`EarlyExitClassifier` with every layer, pooling and classifier in ONNX Runtime.

    Same interface (``predict``, ``classify_batch``, ``from_checkpoint``, ``from_run``); ``graphs`` are
    the sessions (:class:`OnnxGraphs`). The PyTorch model is kept for its configuration (and is what
    the graphs were exported from)."""

    runtime = "onnx"

    def __init__(self, model, tokenizer, policy, graphs: OnnxGraphs, trim_padding: bool = True,
                 decisions: str = "graph") -> None:
        super().__init__(model, tokenizer, policy, trim_padding)
        if decisions not in DECISIONS:
            raise ValueError(f"decisions must be one of {', '.join(DECISIONS)}; got {decisions!r}")
        self.decisions = decisions
        self.chain = True  # batch 1 with decisions in the graphs: the whole early exit as one graph
        if graphs.num_layers != self.num_layers:
            raise ValueError(f"the ONNX graphs in {graphs.folder} have {graphs.num_layers} layers, the model "
                             f"{self.num_layers}")
        self.graphs = graphs

    @classmethod
    def from_checkpoint(cls, checkpoint, policy, threads: int | None = None, rebuild: bool = False,
                        **kw) -> "OnnxEarlyExitClassifier":
        from backbones.multiexit import MultiExitEncoder, load_tokenizer

        ckpt = Path(checkpoint)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {ckpt}")
        kw.pop("runtime", None)
        model = MultiExitEncoder.load(ckpt)
        clf = cls(model, load_tokenizer(ckpt), policy, load_graphs(ckpt, model, threads, rebuild), **kw)
        clf.checkpoint = ckpt
        return clf

    def classify_batch(self, input_ids, attention_mask, token_type_ids=None) -> tuple[np.ndarray, np.ndarray, int]:
        """One padded batch (torch tensors or numpy arrays): log-probs at the exit layer [B, C], exit layers
        [B] (1-based), layer calls made."""
        ids, mask = _np(input_ids), _np(attention_mask)
        g = self.graphs
        static = type(self.policy) is StaticExit
        dec = None if static else self.decision_graphs()
        if dec is not None:
            return self._classify_decided(dec, ids, mask, token_type_ids)
        hidden, pooled, logp, *ctx = g.first(ids, mask, None if token_type_ids is None else _np(token_type_ids))
        if static:  # reads no outputs: k layers, the k-th classifier
            k = min(max(int(self.policy.k), 1), self.num_layers)
            for l in range(1, k):
                hidden, _, logp = g.layer(l, hidden, mask, ctx)
            return logp, np.full(ids.shape[0], k, dtype=np.int64), k
        first = (hidden, pooled, logp)

        def step(l, hidden, mask):
            return first if l == 0 else g.layer(l, hidden, mask, ctx)

        return self.exit_loop(hidden, mask, step, self._shrinker(ctx))

    def _shrinker(self, ctx: list, carry: list | None = None):
        """``exit_loop``'s ``shrink``: keep the rows still in (and the columns they need), then remake the layers'
        context ``ctx`` for them; ``carry`` (the decision graphs' history) keeps the same rows."""
        g = self.graphs

        def shrink(hidden, mask, keep, cols):
            if carry is not None:
                carry[:] = [c[keep] for c in carry]
            hidden, mask = hidden[keep], mask[keep]
            if cols is not None:
                hidden, mask = hidden[:, cols[0]:cols[1]], mask[:, cols[0]:cols[1]]
            hidden, mask = np.ascontiguousarray(hidden), np.ascontiguousarray(mask)
            ctx[:] = g.context(hidden, mask)  # (the remaining rows' context, for the layers after this one)
            return hidden, mask

        return shrink

    def decision_graphs(self):
        """The layer graphs merged with the policy's exported decision (:mod:`agents.inference.onnx_decision`),
        built once per policy and threshold (as the numpy stepper: a policy whose weights change after the first
        batch needs a new classifier); None when the decision stays in numpy: ``decisions="numpy"`` or a policy
        whose decision does not export."""
        policy = self.policy
        if self.decisions == "numpy":
            return None
        knobs = (getattr(policy, "threshold", None), getattr(policy, "patience", None))
        cached = getattr(self, "_decision_cache", None)
        if cached is None or cached[0] is not policy or cached[1] != knobs:
            from agents.inference.onnx_decision import DecisionGraphs

            hidden = int(self.model.encoder.config.hidden_size)
            self._decision_cache = cached = (policy, knobs, DecisionGraphs.for_policy(
                self.graphs, policy, len(self.label_names), hidden))
        return cached[2]

    def _classify_decided(self, dec, ids, mask, token_type_ids):
        if ids.shape[0] == 1 and self.chain:  # one call: every layer after the first inside an If on the decision
            logp, layer = dec.chain(ids, mask, None if token_type_ids is None else _np(token_type_ids))
            return logp, np.array([layer], dtype=np.int64), layer
        g, n_ctx = self.graphs, len(self.graphs.ctx_names)
        hidden, logp, *rest = dec.first(ids, mask, None if token_type_ids is None else _np(token_type_ids))
        ctx, ex, carry = rest[:n_ctx], rest[n_ctx], rest[n_ctx + 1:]
        first = (hidden, None, logp, ex)
        last = self.num_layers - 1

        def step(l, hidden, mask):
            if l == 0:
                return first
            if l == last:  # the last layer always exits: no decision
                hidden, _, logp = g.layer(l, hidden, mask, ctx)
                return hidden, None, logp
            hidden, logp, ex, *c = dec.layer(l, hidden, mask, ctx, carry)
            carry[:] = c
            return hidden, None, logp, ex

        return self.exit_loop(hidden, mask, step, self._shrinker(ctx, carry), decided=True)


def _np(x) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.int64 and x.flags.c_contiguous:  # (as it comes, the common case)
        return x
    a = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(a, dtype=np.int64)
