"""An early-exit classifier that really skips layers: a multi-exit backbone plus an exit policy.

    clf = EarlyExitClassifier.from_run("runs/reinforce/<run>")         # backbone named in the run's JSON
    clf = EarlyExitClassifier.from_checkpoint(ckpt_dir, StaticExit(3))  # any ExitPolicy / heuristic rule
    res = clf.predict(["A man sleeps."], ["Nobody sleeps."], batch_size=32)
    res.labels, res.label_ids, res.probs, res.exit_layers                 # names, ids, [N, C], 1-based

The transformer runs one layer at a time. After layer l the internal classifier
reads the pooled state, and the policy is asked :meth:`ExitPolicy.exit_at_layer`
with the batch's states and log-probabilities of layers 1..l -- the question the
evaluator asks over a cached split (policies that vectorise ``exit_mask`` answer it
with the same function computed in one go), so the exits and predictions are those
the evaluator reports; log-probabilities agree up to float rounding (~1e-7) where
the padding or batch shape differs from the cache's. Instances
that exit leave the batch: their rows are dropped from the token states, the
attention mask and the layer mask (and padding columns beyond the longest
remaining instance are cut), and the batch ends when its last instance exits.
The last layer always exits. A :class:`StaticExit` reads no classifier output, so
its instances just run k layers and one classifier.

Per layer the loop pools, classifies and asks the policy; with the stock heads
(Dropout + Linear) and mean pooling it does so with ``F.linear`` and a mask and
denominator computed once per batch, the same operations as ``model.pool`` /
``model.classify`` in eval mode (bit-identical; checked against ``model.forward``).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from agents.inference import RUNTIMES
from agents.policies import ExitPolicy, LayerMLPPolicy, LearnedExit, StaticExit

__all__ = ["PredictResult", "EarlyExitClassifier", "full_depth_logits", "resolve_policy_checkpoint", "load_policy",
           "check_policy_fits", "check_threshold", "RUNTIMES"]


@dataclass
class PredictResult:
    """Predictions of an early-exit run, in input order."""

    label_ids: np.ndarray  # int64 [N]
    labels: list[str]  # label names [N] (the id as a string when the checkpoint has no names)
    probs: np.ndarray  # float32 [N, C]: softmax of the exit layer's internal classifier
    exit_layers: np.ndarray  # int64 [N], 1-based
    log_probs: np.ndarray  # float32 [N, C]: log-softmax at the exit layer (as in the layer cache)
    num_layers: int
    label_names: tuple[str, ...] = ()
    layer_calls: int = 0  # transformer layer calls made (one per batch and layer reached)
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.label_ids)

    @property
    def avg_exit_layer(self) -> float:
        return float(self.exit_layers.mean()) if len(self) else float("nan")

    @property
    def saved_layers(self) -> float:
        """1 - average exit layer / L (the evaluator's definition)."""
        return 1.0 - self.avg_exit_layer / self.num_layers

    @property
    def confidence(self) -> np.ndarray:
        """float32 [N]: probability of the predicted label."""
        return self.probs[np.arange(len(self)), self.label_ids]

    def to_tsv(self, gold: Sequence[int] | None = None) -> str:
        """``index, label, exit_layer, probability`` (+ ``gold`` if given), one line per instance, with a header."""
        head = ["index", "label", "exit_layer", "probability"] + (["gold"] if gold is not None else [])
        lines = ["\t".join(head)]
        conf = self.confidence
        for i in range(len(self)):
            row = [str(i), self.labels[i], str(int(self.exit_layers[i])), f"{float(conf[i]):.6f}"]
            if gold is not None:
                g = int(gold[i])
                row.append(self.label_names[g] if 0 <= g < len(self.label_names) else str(g))
            lines.append("\t".join(row))
        return "\n".join(lines) + "\n"


class EarlyExitClassifier:
    """A multi-exit encoder (:class:`backbones.multiexit.MultiExitEncoder`), its tokenizer and an exit policy.

    ``policy`` is any :class:`agents.policies.ExitPolicy` (learned, static, heuristic): only
    ``exit_at_layer`` and ``needs_states`` are used, or the policy's ``stepper()`` when it has one
    (:mod:`agents.policies.stepper`: the same decisions from each layer's outputs alone, in numpy;
    ``use_stepper = False`` asks ``exit_at_layer`` instead). ``trim_padding`` cuts padding columns
    no remaining instance needs after instances leave a batch (exact up to float rounding).
    """

    use_stepper = True

    def __init__(self, model, tokenizer, policy: ExitPolicy, trim_padding: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.policy = policy
        self.trim_padding = trim_padding
        self.checkpoint: Path | None = None  # set by from_checkpoint / from_run
        self.meta: dict = {}  # the policy run's record (from_run)
        self.num_layers = model.num_layers
        self.max_length = model.config.max_length
        names = tuple(model.config.label_names)
        self.label_names = names if names else tuple(str(i) for i in range(model.config.num_labels))
        net = getattr(policy, "net", None)
        if isinstance(net, LayerMLPPolicy):
            from cee_env.observations import obs_size

            hidden = model.encoder.config.hidden_size
            want = obs_size(net.features, hidden, self.num_layers, model.config.num_labels)
            if net.num_layers != self.num_layers or net.state_dim != want:
                raise ValueError(
                    f"policy expects {net.num_layers} layers and {net.features!r} observations of size "
                    f"{net.state_dim}; this backbone ({self.num_layers} layers of size {hidden}, "
                    f"{model.config.num_labels} classes) gives size {want}"
                )

    # ------------------------------------------------------------------ building
    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, policy: ExitPolicy, runtime: str = "torch",
                        **kw) -> "EarlyExitClassifier":
        """A stage-1 (or co-trained) checkpoint directory and any exit policy. ``runtime="onnx"`` gives an
        :class:`~agents.inference.onnx_runtime.OnnxEarlyExitClassifier` (keywords ``threads``, ``rebuild``)."""
        from backbones.multiexit import MultiExitEncoder, load_tokenizer

        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
        if runtime == "onnx":
            from agents.inference.onnx_runtime import OnnxEarlyExitClassifier

            return OnnxEarlyExitClassifier.from_checkpoint(checkpoint, policy, **kw)

        ckpt = Path(checkpoint)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {ckpt}")
        clf = cls(MultiExitEncoder.load(ckpt), load_tokenizer(ckpt), policy, **kw)
        clf.checkpoint = ckpt
        return clf

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 threshold: float | None = None, trust_pickle: bool = False, **kw) -> "EarlyExitClassifier":
        """A trained policy run and its backbone.

        Runs of ``agents.reinforce`` (``policy.safetensors`` + ``policy.json``: a
        :class:`LearnedExit`, exit when pi > ``threshold``, default policy.json's
        ``threshold``, else the threshold of a ``calibration.json`` written by ``agents.calibrate``,
        else 0.5, the paper's rule) and of ``agents.sb3``
        (``sb3_policy.safetensors`` + ``sb3_policy.json``: an ``SB3Exit``) are understood;
        weights are checked against the sha256 their JSON records. An older SB3 run with
        only a pickled ``model.zip`` is refused unless ``trust_pickle``. The backbone is
        ``checkpoint`` if given, else the ``checkpoint`` key of the run's JSON (relative to
        the runs directory when written inside it), else the default stage-1 checkpoint
        of its ``task`` key.
        """
        run = Path(run_dir)
        policy, meta = load_policy(run, threshold, trust_pickle)
        ckpt = Path(checkpoint) if checkpoint is not None else resolve_policy_checkpoint(run, meta)
        clf = cls.from_checkpoint(ckpt, policy, **kw)
        check_policy_fits(run, meta, label_names=clf.label_names, num_layers=clf.num_layers, checkpoint=ckpt)
        clf.meta = meta
        return clf

    # ------------------------------------------------------------------ inference
    def tokenize(self, texts: Sequence[str], texts_b: Sequence[str] | None = None) -> list[dict]:
        """Token ids per instance, exactly as :class:`backbones.data.Encoded` makes them
        (pairs only if some second text is non-empty; truncation to the checkpoint's max length)."""
        texts = [str(t) for t in texts]
        if texts_b is not None:
            texts_b = ["" if t is None else str(t) for t in texts_b]
            if len(texts_b) != len(texts):
                raise ValueError(f"texts_b has {len(texts_b)} entries, texts has {len(texts)}")
            if not any(texts_b):
                texts_b = None
        if not texts:
            return []
        enc = self.tokenizer(texts, texts_b, truncation=True, max_length=self.max_length)
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]

    def batches(self, features: list[dict], batch_size: int = 32, sort_by_length: bool = False):
        """Yield ``(indices, padded inputs)``; ``sort_by_length`` groups similar lengths (less padding)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.arange(len(features))
        if sort_by_length:
            order = np.argsort([-len(f["input_ids"]) for f in features], kind="stable")
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = self.tokenizer.pad([dict(features[i]) for i in idx], return_tensors="pt")
            yield idx, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    def predict(self, texts: Sequence[str], texts_b: Sequence[str] | None = None, batch_size: int = 32,
                sort_by_length: bool = False) -> PredictResult:
        """Classify raw texts (or pairs), each instance stopping at its exit layer.

        Batches follow the input order unless ``sort_by_length`` (results are always
        returned in input order).
        """
        feats = self.tokenize(texts, texts_b)
        n, c = len(feats), len(self.label_names)
        ids = np.zeros(n, dtype=np.int64)
        logps = np.zeros((n, c), dtype=np.float32)
        exits = np.zeros(n, dtype=np.int64)
        calls = 0
        for idx, inputs in self.batches(feats, batch_size, sort_by_length):
            logp, ex, k = self.classify_batch(**inputs)
            logps[idx] = logp
            ids[idx] = logp.argmax(-1)
            exits[idx] = ex
            calls += k
        return PredictResult(
            label_ids=ids, labels=[self.label_names[i] for i in ids], probs=np.exp(logps), exit_layers=exits,
            log_probs=logps,
            num_layers=self.num_layers, label_names=self.label_names, layer_calls=calls,
            stats={"batch_size": batch_size, "policy": getattr(self.policy, "name", type(self.policy).__name__)},
        )

    @torch.inference_mode()
    def classify_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """One padded batch: log-probs at the exit layer [B, C], exit layers [B] (1-based), layer calls made."""
        model, policy, L = self.model, self.policy, self.num_layers
        b = input_ids.shape[0]
        hidden, lmask = model.embed(input_ids, attention_mask, token_type_ids)
        if type(policy) is StaticExit:  # reads no outputs: run k layers, one classifier (same exits by definition)
            k = min(max(int(policy.k), 1), L)
            for l in range(k):
                hidden = model.run_layer(l, hidden, lmask)
            logp = torch.log_softmax(model.classify(k - 1, model.pool(hidden, attention_mask)).float(), -1)
            return logp.numpy(), np.full(b, k, dtype=np.int64), k
        heads = None if model.training else _linear_heads(model)
        fast_pool = model.config.pooling == "mean" and _is_stock_pool(model)
        ctx = {}

        def prepare(hidden, mask, lmask):  # the layers' context (and the mean-pooling mask) of the current rows
            ctx["lmask"] = lmask
            if fast_pool:  # MultiExitEncoder.pool's mean pooling, its mask and denominator computed once
                ctx["pm"] = pm = mask.unsqueeze(-1).to(hidden.dtype)
                ctx["denom"] = pm.sum(1).clamp(min=1.0)

        def step(l, hidden, mask):
            hidden = model.run_layer(l, hidden, ctx["lmask"])
            pooled = (hidden * ctx["pm"]).sum(1) / ctx["denom"] if fast_pool else model.pool(hidden, mask)
            logits = F.linear(pooled, *heads[l]) if heads else model.classify(l, pooled)
            return hidden, pooled.float().numpy(), torch.log_softmax(logits.float(), -1).numpy()

        def shrink(hidden, mask, keep, cols):
            keep = torch.from_numpy(keep)
            hidden, mask = hidden[keep], mask[keep]
            if cols is not None:
                hidden, mask = hidden[:, cols[0]:cols[1]], mask[:, cols[0]:cols[1]]
            prepare(hidden, mask, model.layer_mask(hidden, mask))
            return hidden, mask

        prepare(hidden, attention_mask, lmask)
        return self.exit_loop(hidden, attention_mask, step, shrink)

    def _policy_stepper(self):
        """The policy's stepper, built once per policy and threshold (building reads the network's weights, which
        costs about as much as a decision): a policy whose weights change after the first batch needs a new
        classifier."""
        policy = self.policy
        if not self.use_stepper or not hasattr(policy, "stepper"):
            return None
        key = (policy, getattr(policy, "threshold", None))
        cached = getattr(self, "_stepper_cache", None)
        if cached is None or cached[0][0] is not policy or cached[0][1] != key[1]:
            self._stepper_cache = cached = (key, policy.stepper())
        return cached[1]

    def exit_loop(self, hidden, mask, step, shrink, decided: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """The early-exit bookkeeping every runtime shares: after each layer the policy is asked, exited rows
        leave the batch (and padding columns no remaining row needs are cut when ``trim_padding``).

        ``step(l, hidden, mask) -> (hidden, pooled [B, H], log_probs [B, C])`` runs layer ``l`` and its
        classifier (pooled and log_probs as numpy float32); ``shrink(hidden, mask, keep, cols)`` keeps the
        rows ``keep`` (int indices) and the columns ``cols = (lo, hi)`` (None: all). ``hidden`` and ``mask``
        are the runtime's own arrays; ``mask`` must convert with ``np.asarray``. With ``decided``, ``step`` returns
        the layer's exit decisions [B] as a fourth value (the runtime made them) and the policy is not asked.
        """
        policy, L, c = self.policy, self.num_layers, len(self.label_names)
        stepper = None if decided else self._policy_stepper()
        needs_states = getattr(stepper or policy, "needs_states", True)
        b = mask.shape[0]
        rows = np.arange(b)  # original row of each row still in the batch
        out_logp = np.empty((b, c), dtype=np.float32)
        out_exit = np.empty(b, dtype=np.int64)
        hist_logp = np.empty((b, L, c), dtype=np.float32) if stepper is None else None  # rows still in the batch
        hist_states = None
        if stepper is not None:
            stepper.start(b)
        for l in range(L):
            hidden, pooled, logp, *given = step(l, hidden, mask)
            if l == L - 1:
                out_logp[rows], out_exit[rows] = logp, L
                return out_logp, out_exit, L
            if decided:
                ex = given[0]
            elif stepper is not None:  # this layer's outputs only; the stepper carries what it needs
                ex = stepper.decide(l, pooled if needs_states else None, logp)
            else:
                hist_logp[:, l] = logp
                if needs_states:
                    if hist_states is None:
                        hist_states = np.empty((b, L, pooled.shape[-1]), dtype=np.float32)
                    hist_states[:, l] = pooled
                st = hist_states[:, : l + 1] if needs_states else None
                ex = np.asarray(policy.exit_at_layer(l, st, hist_logp[:, : l + 1]), dtype=bool)
            if ex.shape != (rows.shape[0],):
                raise ValueError(f"policy {policy!r} returned exit decisions of shape {ex.shape}, "
                                 f"expected ({rows.shape[0]},)")
            if not ex.any():
                continue
            out_logp[rows[ex]], out_exit[rows[ex]] = logp[ex], l + 1
            if ex.all():
                return out_logp, out_exit, l + 1
            keep = np.flatnonzero(~ex)
            rows = rows[keep]
            if stepper is not None:
                stepper.keep(keep)
            elif not decided:
                hist_logp = hist_logp[keep]
                if needs_states:
                    hist_states = hist_states[keep]
            cols = None
            if self.trim_padding:
                used = np.flatnonzero(np.asarray(mask)[keep].any(0))
                if used[-1] + 1 - used[0] < mask.shape[1]:
                    cols = (int(used[0]), int(used[-1]) + 1)
            hidden, mask = shrink(hidden, mask, keep, cols)
        raise AssertionError("unreachable: the last layer always exits")


@torch.inference_mode()
def full_depth_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None, plain_forward: bool = False) -> torch.Tensor:
    """The full-depth model: all L layers, then the last internal classifier only -> logits [B, C].

    ``plain_forward`` runs the encoder's own forward (Hugging Face ``model.encoder(...)``)
    instead of the layer-by-layer loop the early-exit classifier uses.
    """
    if plain_forward:
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = model.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
    else:
        hidden, lmask = model.embed(input_ids, attention_mask, token_type_ids)
        for l in range(model.num_layers):
            hidden = model.run_layer(l, hidden, lmask)
    # the model's own forward ends with a decoder's final norm, which pooling applies to stepped states
    return model.classify(model.num_layers - 1, model.pool(hidden, attention_mask, finished=plain_forward))


def _linear_heads(model) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
    """(weight, bias) of every internal classifier when each is Dropout + Linear (the stock heads; in eval
    mode exactly ``F.linear``), else None (then ``model.classify`` is called)."""
    from torch import nn

    out = []
    for head in getattr(model, "heads", ()):
        if not (isinstance(head, nn.Sequential) and len(head) == 2 and type(head[0]) is nn.Dropout
                and type(head[1]) is nn.Linear):
            return None
        out.append((head[1].weight, head[1].bias))
    return out if len(out) == model.num_layers else None


def _is_stock_pool(model) -> bool:
    from backbones.multiexit import MultiExitEncoder

    return getattr(type(model), "pool", None) is MultiExitEncoder.pool


def resolve_policy_checkpoint(run: Path, meta: dict) -> Path:
    """The backbone a policy run was trained on: its JSON's ``checkpoint`` (a relative one is looked up in
    the runs directory first, where runs store it, then, for older runs, the working directory, the run
    and the checkout), else its task's default."""
    from backbones.files import resolve_stored
    from backbones.paths import REPO_ROOT

    ck = meta.get("checkpoint")
    if ck:
        p = Path(ck).expanduser()
        for cand in ([p] if p.is_absolute() else [resolve_stored(p), Path.cwd() / p, run / p, REPO_ROOT / p]):
            if cand.is_dir():
                return cand
        raise FileNotFoundError(f"{run} names checkpoint {ck!r}, which does not exist; "
                                "pass the backbone explicitly (checkpoint=... / --checkpoint)")
    if meta.get("task"):
        from backbones.train import TrainConfig, checkpoint_dir, is_complete

        p = checkpoint_dir(TrainConfig(task=meta["task"]).resolved())
        if is_complete(p):
            return p
        raise FileNotFoundError(f"{run} names no checkpoint and the default {meta['task']} "
                                f"checkpoint {p} is not trained; pass checkpoint=... / --checkpoint")
    raise FileNotFoundError(f"{run}'s JSON names neither a checkpoint nor a task; "
                            "pass the backbone explicitly (checkpoint=... / --checkpoint)")


def load_policy(run: Path, threshold: float | None = None, trust_pickle: bool = False) -> tuple[ExitPolicy, dict]:
    """The exit policy of a run folder and its JSON record (see :meth:`EarlyExitClassifier.from_run`).

    The exit threshold is ``threshold`` if given, else the one ``agents.calibrate`` chose
    (``calibration.json``: a risk-controlled knob, used only if it was made for this policy's files),
    else policy.json's, else 0.5. Every threshold must be a number in [0, 1] (an error naming where it
    was read otherwise).
    """
    from backbones.files import IntegrityError, read_json

    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"policy run directory not found: {run}")
    if threshold is not None:
        threshold = check_threshold(threshold, "--threshold")
    fix = f"the policy run {run} cannot be trusted: train it again or restore the folder from a copy"
    if (run / "policy.json").is_file() or not (run / "sb3_policy.json").is_file():
        for f in ("policy.json", "policy.safetensors"):
            if not (run / f).is_file():
                raise FileNotFoundError(f"{run} is not a policy run: {f} is missing "
                                        "(or sb3_policy.json + sb3_policy.safetensors for an SB3 run)")
        meta = read_json(run / "policy.json", fix)
        policy = LearnedExit(LayerMLPPolicy.load(run), name=str(meta.get("name", "consistentee")))
        default = check_threshold(meta["threshold"], str(run / "policy.json")) if "threshold" in meta else 0.5
    else:
        from agents.sb3 import SB3Exit

        meta = read_json(run / "sb3_policy.json", fix)
        policy, default = SB3Exit.load(run, trust_pickle=trust_pickle), None  # None: the greedy action
    cal_file = run / "calibration.json"
    if threshold is None and cal_file.is_file():
        again = f"calibrate it again (python -m agents.calibrate --run {run}) or delete {cal_file}"
        cal = read_json(cal_file, again)
        if not cal.get("policy_sha256") or cal["policy_sha256"] != meta.get("sha256"):
            raise IntegrityError(f"{cal_file} was not made for the policy now in {run} (trained again since, or an "
                                 f"older calibration); {again}")
        threshold = check_threshold(cal.get("threshold"), str(cal_file))
        print(f"exit threshold {threshold:.6g} from {cal_file} ({cal.get('risk')} <= {cal.get('epsilon')} "
              f"with probability >= 1 - {cal.get('delta')})", file=sys.stderr)
    policy.threshold = default if threshold is None else threshold
    return policy, meta


def check_threshold(value, where: str) -> float:
    """An exit threshold on pi(exit), read from ``where`` (a flag or a file): a number in [0, 1] (pi > 1 never
    happens, so 1 means "never exit early"); anything else is a ``ValueError`` naming ``where``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0  # NaN fails
    if not ok:
        raise ValueError(f"{where}: the exit threshold must be a number in [0, 1] (exit where pi(exit) > it); "
                         f"got {value!r}")
    return float(value)


def check_policy_fits(run, meta: dict, *, task: str | None = None, label_names=None, num_layers: int | None = None,
                      checkpoint=None) -> None:
    """Refuse a policy for another task, label set, depth or backbone checkpoint than the one it was trained for
    (what its JSON records: :func:`agents.runtime.policy_record`). ``None`` arguments are not checked."""
    again = "use a policy trained for it, or train one (agents.reinforce / agents.fqi / agents.sb3)"
    if task is not None and task != meta.get("task"):
        raise ValueError(f"{run} was trained for task {meta.get('task')}, not {task}; {again}")
    if label_names is not None and list(label_names) != list(meta.get("label_names") or label_names):
        raise ValueError(f"{run} was trained for the labels {list(meta['label_names'])}, not {list(label_names)}; "
                         f"{again}")
    if num_layers is not None and num_layers != meta.get("num_layers", num_layers):
        raise ValueError(f"{run} was trained for {meta['num_layers']} layers, not {num_layers}; {again}")
    if checkpoint is not None:
        from backbones.multiexit import weights_sha256

        if not meta.get("checkpoint_sha256"):
            raise ValueError(f"{run} records no sha256 of the backbone it was trained on (an older run); "
                             "train it again")
        if weights_sha256(checkpoint) != meta["checkpoint_sha256"]:
            raise ValueError(f"{checkpoint} is not the backbone {run} was trained on (other weights); pass that "
                             "checkpoint, or train a policy for this one")
