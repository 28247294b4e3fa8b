"""Early-exit prediction on raw text: a backbone checkpoint plus an exit policy, layers really skipped.

    python -m agents.predict --run runs/reinforce/<run> --input texts.txt
    python -m agents.predict --run DIR --task RTE --input dev.tsv --out preds.tsv
    python -m agents.predict --run DIR --task RTE --runtime onnx --threads 1   # layers in ONNX Runtime (fast path)
    python -m agents.predict --run DIR --task-file my_task.toml --split test   # your own task's test file
    python -m agents.predict --checkpoint runs/stage1/RTE-all-MiniLM-L6-v2-mean-eq1-s0 --rule static-3 \\
        --text "A man is sleeping." --text-b "Nobody sleeps."

Input: ``--input FILE`` is a plain text file (one instance per line; a tab splits a
line into a sentence pair; blank lines are skipped), or with ``--task`` a file in
that task's format (read by ``backbones.tasks.load_split``; gold labels, if any,
are scored). ``--task`` without ``--input`` reads the task's ``--split`` from the
data directory. ``--task-file`` stands for ``--task`` with your own task (a JSON or
TOML file, ``backbones.tasks.load_task_file``). ``--text`` (repeatable, with
optional matching ``--text-b``) classifies texts given on the command line.

Output: TSV with a header, one line per instance in input order: index, label,
exit layer (1-based) and the probability of the label (+ the gold label when the
input has them), to ``--out`` or stdout. A summary goes to stderr.

Exit rules for ``--rule`` (with ``--checkpoint``): ``static-K`` (every instance exits
at layer K), ``full`` (no early exit), and the heuristics of ``agents.policies.heuristics``:
``maxprob:THR`` (exit once the top class probability > THR), ``entropy:THR`` (DeeBERT:
once the prediction entropy in nats < THR), ``patience:K`` (PABEE: once K+1 layers in
a row agree).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agents.inference import RUNTIMES
from agents.policies import ExitPolicy, StaticExit
from backbones.cli import Repeatable, UserError, parse, user_errors
from backbones.files import read_text_utf8, write_text

__all__ = ["parse_rule", "read_texts", "main"]


# --------------------------------------------------------------------------- exit rules
def parse_rule(rule: str) -> ExitPolicy:
    """An exit rule by name: ``static-K`` | ``full`` | ``maxprob:THR`` | ``entropy:THR`` (or ``deebert:THR``)
    | ``patience:K`` (or ``pabee:K``). The heuristic rules are those of :mod:`agents.policies.heuristics`."""
    r = rule.strip().lower()
    try:
        if r == "full":
            p = StaticExit(10 ** 9)  # never exits before the last layer (which always exits)
            p.name = "full"
            return p
        for prefix in ("static-", "static:"):
            if r.startswith(prefix):
                k = int(r[len(prefix):])
                if k < 1:
                    raise ValueError
                return StaticExit(k)
        kind, _, arg = r.partition(":")
        if kind in ("maxprob", "entropy", "deebert", "patience", "pabee"):
            from agents.policies import heuristics as B

            if kind == "maxprob":
                return B.MaxProbExit(float(arg))
            if kind in ("entropy", "deebert"):
                return B.EntropyExit(float(arg))
            return B.PatienceExit(int(arg))
    except ValueError:
        pass
    raise ValueError(f"unknown exit rule {rule!r}; expected static-K, full, maxprob:THR, entropy:THR or patience:K")


# --------------------------------------------------------------------------- input
def read_texts(path: str | Path) -> tuple[list[str], list[str] | None]:
    """A plain text file (UTF-8): one instance per line, ``text_a<TAB>text_b`` for pairs; blank lines
    skipped. A line with more than one tab is an error naming the line (a third field would otherwise
    end up inside the second text)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    a, b = [], []
    for n, line in enumerate(read_text_utf8(p).split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) > 2:
            raise ValueError(f"{p}, line {n}: {len(fields)} tab-separated fields; expected one text, or two "
                             "(text_a<TAB>text_b) for a pair")
        a.append(fields[0])
        b.append(fields[1] if len(fields) == 2 else "")
    if not a:
        raise ValueError(f"input file {p} holds no texts")
    return a, (b if any(b) else None)


@dataclass
class PredictArgs:
    """Settings of ``python -m agents.predict``; every field is a flag."""

    run: str | None = None
    """model: a policy run directory of agents.reinforce (policy.safetensors + policy.json) or agents.sb3
    (sb3_policy.safetensors + sb3_policy.json); its backbone is the checkpoint named in the run's JSON unless
    --checkpoint"""
    trust_pickle: bool = False
    """allow an older agents.sb3 run that has only a pickled model.zip: loading it runs any code its author
    put in it, so pass this only for folders you trust"""
    checkpoint: str | None = None
    """model: a stage-1 (multi-exit) checkpoint directory"""
    rule: str | None = None
    """exit rule with --checkpoint: static-K, full, maxprob:THR, entropy:THR, patience:K (see above)"""
    threshold: float | None = None
    """exit threshold of a learned policy; None: policy.json's, else 0.5"""
    input: str | None = None
    """input: a text file (one text per line, tab-separated pairs) or, with --task, a file of the task's format"""
    task: str | None = None
    """read --input (or the task's --split from the data directory) in this task's format"""
    task_file: str | None = None
    """a JSON or TOML file describing your own task (see backbones.tasks.load_task_file); stands for --task"""
    split: str = "dev"
    """split name for --task"""
    data_dir: str | None = None
    """data directory for --task without --input"""
    text: Repeatable = ()
    """a text to classify"""
    text_b: Repeatable = ()
    """second text of a pair, one per --text"""
    batch_size: int = 32
    """instances per batch"""
    sort_by_length: bool = False
    """batch similar lengths together (less padding)"""
    threads: int | None = None
    """torch threads (ONNX Runtime intra-op threads with --runtime onnx); None: the runtime's default"""
    runtime: str = "torch"
    """torch (PyTorch eager, the reference) or onnx (every layer in ONNX Runtime, the fast path: the checkpoint
    is exported once to runs/onnx/, checked by sha256 on load; needs pip install -e '.[fast]')"""
    out: str | None = None
    """write the TSV here; None: stdout"""


def check_args(a: PredictArgs) -> None:
    """Raise a :class:`UserError` for flags that do not fit together or name missing files."""
    if not a.run and not a.checkpoint:
        raise UserError("give --run DIR (a policy run) or --checkpoint DIR with --rule RULE")
    if a.run and a.rule:
        raise UserError("--rule replaces a policy run's policy; give --run or --rule, not both")
    if a.checkpoint and not a.run and not a.rule:
        raise UserError("--checkpoint needs --rule (e.g. static-3) or --run")
    if a.runtime not in RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}; got {a.runtime!r}")
    if a.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1; got {a.batch_size}")
    if a.task and a.task_file:
        raise UserError("give --task or --task-file, not both")
    if a.text and (a.input or a.task or a.task_file):
        raise UserError("give either --text or --input/--task, not both")
    if a.text_b and len(a.text_b) != len(a.text):
        raise UserError(f"{len(a.text_b)} --text-b for {len(a.text)} --text; give one per --text or none")
    if not (a.text or a.input or a.task or a.task_file):
        raise UserError("nothing to classify: give --input FILE, --task TASK or --text TEXT")
    for flag, path in (("policy run directory", a.run), ("checkpoint directory", a.checkpoint)):
        if path and not Path(path).is_dir():
            raise UserError(f"{flag} not found: {path}")
    if a.input and not Path(a.input).is_file():
        raise UserError(f"input file not found: {a.input}")
    if a.out:
        from backbones.files import check_writable

        check_writable(Path(a.out).parent)


def _load_inputs(a: PredictArgs) -> tuple[list[str], list[str] | None, np.ndarray | None, object]:
    if a.text:
        return list(a.text), (list(a.text_b) or None), None, None
    if a.task or a.task_file:
        from backbones import tasks as T

        spec = T.load_task_file(a.task_file) if a.task_file else T.get_task(a.task)
        ds = T.load_split(spec, a.split, data_dir=a.data_dir, path=a.input)
        labels = np.asarray(ds["label"], dtype=np.int64)
        return list(ds["text_a"]), list(ds["text_b"]), (labels if (labels >= 0).all() else None), spec
    return (*read_texts(a.input), None, None)


def check_task(spec, clf, run: str | None) -> None:
    """Refuse to classify a task with a policy made for another task or label set, or a backbone made for another
    label set."""
    if run:
        from agents.inference.early_exit_model import check_policy_fits

        check_policy_fits(run, clf.meta, task=spec.name, label_names=spec.label_names)
    if tuple(spec.label_names) != clf.label_names:
        raise UserError(f"the backbone {clf.checkpoint} was trained with the labels {list(clf.label_names)}, not "
                        f"{spec.name}'s {list(spec.label_names)}; pass a checkpoint trained for {spec.name}")


@user_errors
def main(argv: list[str] | None = None) -> int:
    a = parse(PredictArgs, argv, __doc__)
    check_args(a)
    policy = parse_rule(a.rule) if a.rule else None
    texts, texts_b, gold, spec = _load_inputs(a)
    import torch

    from agents.inference.early_exit_model import EarlyExitClassifier

    if a.threads:
        torch.set_num_threads(a.threads)
    kw = {"runtime": a.runtime, **({"threads": a.threads} if a.runtime == "onnx" else {})}
    if a.run:
        clf = EarlyExitClassifier.from_run(a.run, checkpoint=a.checkpoint, threshold=a.threshold,
                                           trust_pickle=a.trust_pickle, **kw)
    else:
        clf = EarlyExitClassifier.from_checkpoint(a.checkpoint, policy, **kw)
    if spec is not None:
        check_task(spec, clf, a.run)
    t0 = time.perf_counter()
    res = clf.predict(texts, texts_b, batch_size=a.batch_size, sort_by_length=a.sort_by_length)
    dt = time.perf_counter() - t0
    tsv = res.to_tsv(gold)
    if a.out:
        write_text(a.out, tsv)
    else:
        sys.stdout.write(tsv)
    hist = np.bincount(res.exit_layers, minlength=res.num_layers + 1)[1:].tolist()
    msg = (f"{len(res)} instances, policy {res.stats['policy']} ({a.runtime}): avg exit layer {res.avg_exit_layer:.2f}/{res.num_layers} "
           f"(saved {100 * res.saved_layers:.1f}%), exits by layer {hist}, {dt:.2f} s")
    if gold is not None and spec is not None:
        from backbones.tasks import compute_metric

        msg += f", {spec.metric} {100 * compute_metric(spec, res.label_ids, gold):.1f}"
    if a.out:
        msg += f"; wrote {a.out}"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
