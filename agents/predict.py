"""Early-exit prediction on raw text: a backbone checkpoint plus an exit policy, layers really skipped.

    python -m agents.predict --run runs/reinforce/<run> --input texts.txt
    python -m agents.predict --run DIR --task RTE --input dev.tsv --out preds.tsv
    python -m agents.predict --checkpoint runs/stage1/RTE-all-MiniLM-L6-v2-mean-eq1-s0 --rule static-3 \\
        --text "A man is sleeping." --text-b "Nobody sleeps."

Input: ``--input FILE`` is a plain text file (one instance per line; a tab splits a
line into a sentence pair; blank lines are skipped), or with ``--task`` a file in
that task's format (read by ``backbones.tasks.load_split``; gold labels, if any,
are scored). ``--task`` without ``--input`` reads the task's ``--split`` from the
data directory. ``--text`` (repeatable, with optional matching ``--text-b``)
classifies texts given on the command line.

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

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from agents.policies import ExitPolicy, StaticExit

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
    """A plain text file: one instance per line, ``text_a<TAB>text_b`` for pairs; blank lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    a, b = [], []
    with open(p, encoding="utf-8-sig") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            x, _, y = line.partition("\t")
            a.append(x)
            b.append(y)
    if not a:
        raise ValueError(f"input file {p} holds no texts")
    return a, (b if any(b) else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agents.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (a policy run, or a checkpoint plus a rule)")
    src.add_argument("--run", help="policy run directory of agents.reinforce (policy.safetensors + policy.json) or "
                                   "agents.sb3 (model.zip + sb3_policy.json); its backbone is the checkpoint named "
                                   "in the run's JSON unless --checkpoint")
    src.add_argument("--checkpoint", help="stage-1 (multi-exit) checkpoint directory")
    src.add_argument("--rule", help="exit rule with --checkpoint: static-K, full, maxprob:THR, entropy:THR, "
                                    "patience:K (see above)")
    src.add_argument("--threshold", type=float, default=None,
                     help="exit threshold of a learned policy (default: policy.json's, else 0.5)")
    inp = p.add_argument_group("input")
    inp.add_argument("--input", help="text file (one text per line, tab-separated pairs) or, with --task, a task file")
    inp.add_argument("--task", help="read --input (or the task's --split from the data directory) in this task's format")
    inp.add_argument("--split", default="dev", help="split name for --task (default dev)")
    inp.add_argument("--data-dir", default=None, help="data directory for --task without --input")
    inp.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    inp.add_argument("--text-b", action="append", default=None, help="second text of a pair, one per --text")
    run = p.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=32, help="instances per batch (default 32)")
    run.add_argument("--sort-by-length", action="store_true", help="batch similar lengths together (less padding)")
    run.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    run.add_argument("--out", help="write the TSV here (default stdout)")
    return p


def _load_inputs(args, parser) -> tuple[list[str], list[str] | None, np.ndarray | None, object]:
    if args.text:
        if args.input or args.task:
            parser.error("give either --text or --input/--task, not both")
        if args.text_b is not None and len(args.text_b) != len(args.text):
            parser.error(f"{len(args.text_b)} --text-b for {len(args.text)} --text; give one per --text or none")
        return list(args.text), args.text_b, None, None
    if args.task:
        from backbones import tasks as T

        spec = T.get_task(args.task)
        ds = T.load_split(spec, args.split, data_dir=args.data_dir, path=args.input)
        labels = np.asarray(ds["label"], dtype=np.int64)
        return list(ds["text_a"]), list(ds["text_b"]), (labels if (labels >= 0).all() else None), spec
    if args.input:
        a, b = read_texts(args.input)
        return a, b, None, None
    parser.error("nothing to classify: give --input FILE, --task TASK or --text TEXT")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from backbones.tasks import TaskError

    if not args.run and not args.checkpoint:
        parser.error("give --run DIR (a policy run) or --checkpoint DIR with --rule RULE")
    if args.run and args.rule:
        parser.error("--rule replaces a policy run's policy; give --run or --rule, not both")
    if args.checkpoint and not args.run and not args.rule:
        parser.error("--checkpoint needs --rule (e.g. static-3) or --run")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.run and not Path(args.run).is_dir():
        parser.error(f"policy run directory not found: {args.run}")
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        parser.error(f"checkpoint directory not found: {args.checkpoint}")
    if args.input and not Path(args.input).is_file():
        parser.error(f"input file not found: {args.input}")
    try:
        policy = parse_rule(args.rule) if args.rule else None
        texts, texts_b, gold, spec = _load_inputs(args, parser)
        import torch

        from agents.inference.early_exit_model import EarlyExitClassifier

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.run:
            clf = EarlyExitClassifier.from_run(args.run, checkpoint=args.checkpoint, threshold=args.threshold)
        else:
            clf = EarlyExitClassifier.from_checkpoint(args.checkpoint, policy)
        t0 = time.perf_counter()
        res = clf.predict(texts, texts_b, batch_size=args.batch_size, sort_by_length=args.sort_by_length)
        dt = time.perf_counter() - t0
    except (FileNotFoundError, TaskError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    tsv = res.to_tsv(gold)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(tsv)
        tmp.replace(out)
    else:
        sys.stdout.write(tsv)
    hist = np.bincount(res.exit_layers, minlength=res.num_layers + 1)[1:].tolist()
    msg = (f"{len(res)} instances, policy {res.stats['policy']}: avg exit layer {res.avg_exit_layer:.2f}/{res.num_layers} "
           f"(saved {100 * res.saved_layers:.1f}%), exits by layer {hist}, {dt:.2f} s")
    if gold is not None and spec is not None:
        from backbones.tasks import compute_metric

        msg += f", {spec.metric} {100 * compute_metric(spec, res.label_ids, gold):.1f}"
    if args.out:
        msg += f"; wrote {args.out}"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
