"""Task catalog and readers: every task's files, columns, labels and metric.

``load_split(task, split)`` turns a task's file into an in-memory
``datasets.Dataset`` with columns ``text_a`` (str), ``text_b`` (str, ``""`` for
single-sentence tasks) and ``label`` (int64; ``-1`` for an unlabelled test file).
Files are read from the data directory (``backbones.paths.data_dir``) or from an
explicit ``path``; nothing is ever written or cached.

File formats (``TaskSpec.fmt``):

- ``glue_tsv``: tab-separated with a header, **no quote handling** (GLUE files
  have fields starting with an unbalanced ``"``).
- ``csv_tsv``: tab-separated with a header, CSV quoting honoured (pandas' default).
- ``mrpc_raw``: MRPC: train is rebuilt from ``msr_paraphrase_train.txt`` minus the
  pairs in ``dev_ids.tsv`` (GLUE/HF construction); any other file is read as ``glue_tsv``.
- ``csv``: comma-separated with a header, CSV quoting honoured.
- ``jsonl``: one JSON object per line (a ``.json`` file holding one list also works).

A file passed by path is read by its extension when it is ``.csv``/``.jsonl``/
``.json``, otherwise in the task's own tab format.
"""
from __future__ import annotations

import csv
import io
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import datasets
import numpy as np

from backbones import paths
from backbones.files import read_text_utf8

__all__ = [
    "TaskError", "TaskFileNotFound", "UnknownTaskError", "TaskSpec", "TASKS",
    "get_task", "register_task", "task_from_file", "load_task_file", "load_split", "compute_metric", "metric_name",
]

FORMATS = ("glue_tsv", "csv_tsv", "mrpc_raw", "jsonl", "csv")
METRICS = ("accuracy", "f1")
SPLITS = ("train", "dev", "test")
_SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "val": "dev", "eval": "dev"}
_FEATURES = datasets.Features(
    {"text_a": datasets.Value("string"), "text_b": datasets.Value("string"), "label": datasets.Value("int64")}
)


class TaskError(ValueError):
    """A user-fixable problem with a task, its files or its labels."""


class TaskFileNotFound(TaskError, FileNotFoundError):
    """A task file or the data directory does not exist."""


class UnknownTaskError(TaskError, KeyError):
    """No task of that name is registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its files (relative to the data dir, or absolute), columns, labels, metric.

    ``label_values`` are the raw label strings in the files, index = label id
    (e.g. ``"0","1"`` for SST-2); when ``None`` the files hold the label names.
    Label names are accepted in files either way.
    """

    name: str
    label_names: tuple[str, ...]
    metric: str
    splits: dict[str, str]
    text_a: str
    text_b: str | None
    label_col: str
    fmt: str
    label_values: tuple[str, ...] | None = None
    exclude_pairs: str | None = None  # mrpc_raw: file of (id1, id2) pairs dropped from train
    description: str = ""
    group_by_text: bool = False  # rows can share text (e.g. phrases of one sentence): hold out by text group

    def partition_texts(self, ds) -> tuple[str, ...] | None:
        """The texts a train split's rows are grouped by when the task holds out by text group
        (``backbones.protocol.partition(texts=...)``), else None."""
        if not self.group_by_text:
            return None
        return tuple(a if not b else f"{a} [SEP] {b}" for a, b in zip(ds["text_a"], ds["text_b"]))

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def label_lookup(self) -> dict[str, int]:
        """Raw label string in a file -> label id."""
        table = {n: i for i, n in enumerate(self.label_names)}
        table.update({v: i for i, v in enumerate(self.label_values or ())})
        return {**{_raw_label(k): i for k, i in table.items()}, **table}  # "1.0" names label "1" too


_GLUE_NLI = ("entailment", "not_entailment")
_SO_NAMES = (
    "wordpress", "oracle", "svn", "apache", "excel", "matlab", "visual-studio", "cocoa", "osx", "bash",
    "spring", "hibernate", "scala", "sharepoint", "ajax", "qt", "drupal", "linq", "haskell", "magento",
)
# sorted unique intents of MCID/nid_acl2022/train.tsv (checked by tests/test_tasks.py)
_MCID_NAMES = (
    "can i get from feces animal pets", "can i get from packages surfaces", "donate", "hi",
    "how does corona spread", "latest numbers", "myths", "news and press", "okay thanks",
    "protect yourself", "share", "travel", "what are symptoms", "what are treatment options",
    "what if i visited high risk area", "what is corona",
)

_BUILTIN: tuple[TaskSpec, ...] = (
    TaskSpec("RTE", _GLUE_NLI, "accuracy",
             {s: f"glue/RTE/{s}.tsv" for s in SPLITS}, "sentence1", "sentence2", "label", "glue_tsv",
             description="GLUE RTE textual entailment"),
    TaskSpec("MRPC", ("not_paraphrase", "paraphrase"), "f1",
             {"train": "glue/MRPC/msr_paraphrase_train.txt", "dev": "glue/MRPC/dev.tsv", "test": "glue/MRPC/test.tsv"},
             "#1 String", "#2 String", "Quality", "mrpc_raw", label_values=("0", "1"),
             exclude_pairs="glue/MRPC/dev_ids.tsv", description="GLUE MRPC paraphrase; metric is F1 of class 1"),
    TaskSpec("SST2", ("negative", "positive"), "accuracy",
             {s: f"glue/SST-2/{s}.tsv" for s in SPLITS}, "sentence", None, "label", "glue_tsv",
             label_values=("0", "1"), group_by_text=True,
             description="GLUE SST-2 sentiment (train rows are phrases of parsed sentences: held out by sentence)"),
    TaskSpec("QNLI", _GLUE_NLI, "accuracy",
             {s: f"glue/QNLI/{s}.tsv" for s in ("dev", "test")}, "question", "sentence", "label", "glue_tsv",
             description="GLUE QNLI (train.tsv is not in the data directory)"),
    TaskSpec("MCID", _MCID_NAMES, "accuracy",
             {s: f"MCID/nid_acl2022/{s}.tsv" for s in ("train", "dev")}, "text", None, "label", "csv_tsv",
             description="M-CID Covid-19 intents (English), NID ACL 2022 split; test by path"),
    TaskSpec("StackOverflow", _SO_NAMES, "accuracy",
             {s: f"StackOverflow/nid_acl2022/{s}.tsv" for s in ("train", "dev")}, "text", None, "label", "csv_tsv",
             label_values=tuple(str(i) for i in range(1, 21)),
             description="StackOverflow titles, 20 tags, NID ACL 2022 split; test by path"),
)
TASKS: dict[str, TaskSpec] = {t.name: t for t in _BUILTIN}
_BUILTIN_NAMES = frozenset(TASKS)


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c not in "-_ ")


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The task called ``name`` (case-, hyphen- and underscore-insensitive: ``sst-2``, ``M-CID`` work)."""
    if isinstance(name, TaskSpec):
        return name
    by_norm = {_norm(k): v for k, v in TASKS.items()}
    try:
        return by_norm[_norm(str(name))]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def register_task(spec: TaskSpec) -> None:
    """Add (or replace) a user task; built-in tasks cannot be replaced."""
    if spec.fmt not in FORMATS:
        raise TaskError(f"task {spec.name!r}: unknown fmt {spec.fmt!r}; expected one of {', '.join(FORMATS)}")
    if spec.metric not in METRICS:
        raise TaskError(f"task {spec.name!r}: unknown metric {spec.metric!r}; expected one of {', '.join(METRICS)}")
    if spec.metric == "f1" and spec.num_labels != 2:
        raise TaskError(f"task {spec.name!r}: metric 'f1' needs 2 labels, got {spec.num_labels}")
    if len(set(spec.label_names)) != spec.num_labels or spec.num_labels < 2:
        raise TaskError(f"task {spec.name!r}: label names must be >= 2 distinct strings, got {spec.label_names}")
    clash = [k for k in TASKS if _norm(k) == _norm(spec.name)]
    if any(k in _BUILTIN_NAMES for k in clash):
        raise TaskError(f"task name {spec.name!r} clashes with built-in task {clash[0]!r}; choose another name")
    for k in clash:
        del TASKS[k]
    TASKS[spec.name] = spec


def _fmt_for_file(file: Path, default: str) -> str:
    ext = file.suffix.lower()
    if ext in (".jsonl", ".json"):
        return "jsonl"
    if ext == ".csv":
        return "csv"
    return default if default in ("glue_tsv", "csv_tsv", "mrpc_raw") else "csv_tsv"


_INTEGRAL = re.compile(r"[+-]?\d+\.0*")


def _raw_label(v: Any) -> str | None:
    """A label as the string it is looked up by; an integral number is one label however it is written
    (``1``, ``1.0``, ``1.`` in a CSV or JSON file are all ``"1"``)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    v = str(v).strip()
    return str(int(float(v))) if _INTEGRAL.fullmatch(v) else v


def _open_text(file: Path, what: str) -> io.StringIO:
    """The file's text (UTF-8) as a file-like object named after it; bytes that are not UTF-8 are a
    :class:`TaskError` naming the file and line."""
    if not file.is_file():
        raise TaskFileNotFound(f"{what} not found: {file}")
    try:
        fh = io.StringIO(read_text_utf8(file), newline="")
    except ValueError as e:
        raise TaskError(str(e)) from None
    fh.name = str(file)
    return fh


def _iter_rows(file: Path, fmt: str, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(1-based line number, {column: value})`` for each data row of ``file``."""
    with _open_text(file, what) as fh:
        if fmt == "jsonl":
            text = fh.read()
            if text.lstrip().startswith("["):
                try:
                    records = json.loads(text)
                except json.JSONDecodeError as e:
                    raise TaskError(f"{file}, line {e.lineno}: invalid JSON ({e.msg})") from None
                items = enumerate(records, 1)
            else:
                items = ((n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip())
            for n, item in items:
                if isinstance(item, str):
                    try:
                        item = json.loads(item)
                    except json.JSONDecodeError as e:
                        raise TaskError(f"{file}, line {n}: invalid JSON ({e.msg})") from None
                if not isinstance(item, dict):
                    raise TaskError(f"{file}, line {n}: expected a JSON object, got {type(item).__name__}")
                yield n, item
            return
        if fmt in ("glue_tsv", "mrpc_raw"):  # no quote handling; only "\n" ends a line
            rows: Iterator[tuple[int, list[str]]] = (
                (n, line.rstrip("\r\n").split("\t")) for n, line in enumerate(fh.read().split("\n"), 1)
                if line.strip("\r\n")
            )
        else:
            rows = _csv_rows(fh, "," if fmt == "csv" else "\t")
        header: list[str] | None = None
        for n, row in rows:
            if header is None:
                header = [h.strip() for h in row]
                continue
            if len(row) != len(header):
                hint = "" if fmt in ("glue_tsv", "mrpc_raw") else \
                    " (if a field starts with an unbalanced quote, read the file without quoting: fmt='glue_tsv')"
                raise TaskError(f"{file}, line {n}: malformed row: expected {len(header)} fields "
                                f"({', '.join(header)}), got {len(row)}{hint}")
            yield n, dict(zip(header, row))
        if header is None:
            raise TaskError(f"{file}: empty file (no header line)")


def _csv_rows(fh, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(fh, delimiter=delimiter)
    start = 1
    try:
        for row in reader:
            if row and any(row):
                yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise TaskError(f"{fh.name}, line {start}: malformed CSV ({e})") from None


def _read(spec: TaskSpec, file: Path, fmt: str, split: str, what: str,
          drop_pairs: set[tuple[str, str]] | None = None) -> datasets.Dataset:
    """Read one file of ``spec`` into a Dataset, checking columns and labels."""
    lookup = spec.label_lookup()
    cols = [spec.text_a] + ([spec.text_b] if spec.text_b else [])
    a: list[str] = []
    b: list[str] = []
    y: list[int] = []
    labelled: bool | None = None
    for n, rec in _iter_rows(file, fmt, what):
        missing = [c for c in cols if c not in rec]
        if missing:
            raise TaskError(f"{file}, line {n}: missing column(s) {missing} for task {spec.name}; "
                            f"found {list(rec)}")
        if labelled is None:
            labelled = spec.label_col in rec
            if not labelled and split != "test":
                raise TaskError(f"{file}: no label column {spec.label_col!r} (found {list(rec)}); "
                                f"only a test file may be unlabelled")
        if drop_pairs is not None and (str(rec["#1 ID"]).strip(), str(rec["#2 ID"]).strip()) in drop_pairs:
            continue
        texts = []
        for c in cols:
            v = rec[c]
            if v is None:
                raise TaskError(f"{file}, line {n}: column {c!r} is null")
            texts.append(v if isinstance(v, str) else str(v))
        if labelled:
            if spec.label_col not in rec:
                raise TaskError(f"{file}, line {n}: missing label column {spec.label_col!r}")
            raw = _raw_label(rec[spec.label_col])
            if raw not in lookup:
                allowed = spec.label_values or spec.label_names
                raise TaskError(f"{file}, line {n}: unknown label {rec[spec.label_col]!r} for task {spec.name}; "
                                f"allowed: {', '.join(map(repr, allowed))}"
                                + (f" (or names {', '.join(spec.label_names)})" if spec.label_values else ""))
            y.append(lookup[raw])
        else:
            y.append(-1)
        a.append(texts[0])
        b.append(texts[1] if spec.text_b else "")
    if not a:
        raise TaskError(f"{file}: no data rows ({what})")
    return datasets.Dataset.from_dict({"text_a": a, "text_b": b, "label": y}, features=_FEATURES)


def _mrpc_pairs(file: Path) -> set[tuple[str, str]]:
    with _open_text(file, "MRPC dev pair list (dev_ids.tsv, used to rebuild the train split)") as fh:
        pairs = set()
        for n, line in enumerate(fh.read().split("\n"), 1):
            if line.strip():
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise TaskError(f"{file}, line {n}: malformed row: expected 2 fields (id1, id2), got {len(parts)}")
                pairs.add((parts[0], parts[1]))
    return pairs


def load_split(task: str | TaskSpec, split: str, data_dir: str | Path | None = None,
               path: str | Path | None = None) -> datasets.Dataset:
    """Read ``split`` ("train", "dev", "test") of ``task`` as a Dataset (text_a, text_b, label).

    ``path`` reads that file instead of the catalog's (e.g. a labelled test file);
    ``data_dir`` overrides ``$CEE_DATA_DIR`` / ``../shared/data`` for catalog files.
    """
    spec = get_task(task)
    split = _SPLIT_ALIASES.get(split.lower(), split.lower())
    if split not in SPLITS and split not in spec.splits:
        raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    what = f"{spec.name} {split} file"
    if path is not None:
        file = Path(path).expanduser().resolve()
        return _read(spec, file, _fmt_for_file(file, spec.fmt), split, what)
    rel = spec.splits.get(split)
    if rel is None:
        have = ", ".join(spec.splits) or "none"
        raise TaskError(f"{spec.name} has no {split} split in the data directory (available: {have}); "
                        f"supply a file with path=... (command line: --{split}-file)")

    def resolve(p: str) -> Path:
        if Path(p).is_absolute():
            return Path(p)
        try:
            return paths.data_dir(data_dir) / p
        except FileNotFoundError as e:
            raise TaskFileNotFound(str(e)) from None

    file = resolve(rel)
    if spec.fmt == "mrpc_raw" and split == "train" and spec.exclude_pairs:
        return _read(spec, file, "mrpc_raw", split, f"{what} (raw msr_paraphrase_train.txt)",
                     drop_pairs=_mrpc_pairs(resolve(spec.exclude_pairs)))
    return _read(spec, file, _fmt_for_file(file, spec.fmt), split, what)


def task_from_file(name: str, train_path: str | Path, text_a: str, label: str, text_b: str | None = None,
                   dev_path: str | Path | None = None, test_path: str | Path | None = None,
                   label_names: Sequence[str] | None = None, metric: str = "accuracy",
                   fmt: str | None = None, group_by_text: bool = False) -> TaskSpec:
    """Define and register a user task from CSV / TSV / JSONL files (format from the train file's extension).

    ``.csv`` -> csv, ``.jsonl``/``.json`` -> jsonl, anything else -> quote-aware TSV
    (pass ``fmt="glue_tsv"`` for tab files without quoting). Without ``label_names``
    they are the train file's distinct labels, sorted (numerically if all are
    integers). With ``label_names``, the files may hold the names or ids 0..n-1.
    ``group_by_text``: rows can share text (one text a span of another), so calib rows are held
    out by text group (``backbones.protocol.partition``).
    """
    files = {"train": train_path, "dev": dev_path, "test": test_path}
    splits = {}
    for s, p in files.items():
        if p is not None:
            f = Path(p).expanduser().resolve()
            if not f.is_file():
                raise TaskFileNotFound(f"{name} {s} file not found: {f}")
            splits[s] = str(f)
    train = Path(splits["train"])
    fmt = fmt or _fmt_for_file(train, "csv_tsv")
    if fmt not in FORMATS:
        raise TaskError(f"unknown fmt {fmt!r}; expected one of {', '.join(FORMATS)}")
    raw: set[str] = set()
    for n, rec in _iter_rows(train, fmt, f"{name} train file"):
        if label not in rec:
            raise TaskError(f"{train}, line {n}: no label column {label!r}; found {list(rec)}")
        v = _raw_label(rec[label])
        if not v:
            raise TaskError(f"{train}, line {n}: missing label in column {label!r}")
        raw.add(v)
    if not raw:
        raise TaskError(f"{train}: no data rows ({name} train file)")
    ints = all(v.lstrip("-").isdigit() for v in raw)
    values: tuple[str, ...] | None = None
    if label_names is None:
        names = tuple(sorted(raw, key=int) if ints else sorted(raw))
    else:
        names = tuple(label_names)
        if not raw <= set(names):
            if ints and raw <= {str(i) for i in range(len(names))}:
                values = tuple(str(i) for i in range(len(names)))
            else:
                raise TaskError(f"{train}: labels {sorted(raw - set(names))} are not in label_names {list(names)} "
                                f"(nor ids 0..{len(names) - 1})")
    spec = TaskSpec(name, names, metric, splits, text_a, text_b, label, fmt, label_values=values,
                    description=f"user task from {train}", group_by_text=group_by_text)
    register_task(spec)
    return spec


# key of a task file -> (required?, what it holds)
_TASK_FILE_KEYS: dict[str, tuple[bool, str]] = {
    "name": (True, "the task's name"), "train": (True, "the train file"), "dev": (False, "the dev file"),
    "test": (False, "a labelled test file"), "text_a": (True, "the text column"),
    "text_b": (False, "the second text column of a pair"), "label": (True, "the label column"),
    "label_names": (False, "a list of two or more label names"), "metric": (True, "accuracy or f1"),
    "fmt": (False, "a file format: " + ", ".join(FORMATS)),
    "group_by_text": (False, "true when rows can share text (one row's text a span of another's), so calib rows "
                             "are held out by text group"),
}


def load_task_file(path: str | Path) -> TaskSpec:
    """Register the task described by a small JSON or TOML file (by extension) and return it.

    Keys: ``name``, ``train`` and optionally ``dev`` / ``test`` (data files; relative paths are
    resolved against the task file's folder), ``text_a``, optionally ``text_b``, ``label`` (column
    names), optionally ``label_names``, ``metric`` (``accuracy`` or ``f1``) and optionally ``fmt``
    and optionally ``group_by_text`` (as :func:`task_from_file`, which reads the files)::

        name = "Reviews"
        train = "train.csv"
        dev = "dev.csv"
        text_a = "review"
        label = "sentiment"
        metric = "accuracy"
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise TaskFileNotFound(f"task file not found: {file}")
    try:
        text = read_text_utf8(file)
    except ValueError as e:
        raise TaskError(f"task file {e}") from None
    try:
        if file.suffix.lower() == ".json":
            d = json.loads(text)
        elif file.suffix.lower() == ".toml":
            d = tomllib.loads(text)
        else:
            raise TaskError(f"task file {file}: expected a .json or .toml file")
    except json.JSONDecodeError as e:
        raise TaskError(f"task file {file}, line {e.lineno}: invalid JSON ({e.msg})") from None
    except tomllib.TOMLDecodeError as e:
        raise TaskError(f"task file {file}: invalid TOML ({e})") from None
    if not isinstance(d, dict):
        raise TaskError(f"task file {file}: expected a table of keys, got {type(d).__name__}")
    unknown = [k for k in d if k not in _TASK_FILE_KEYS]
    if unknown:
        raise TaskError(f"task file {file}: unknown key {unknown[0]!r}; expected keys {', '.join(_TASK_FILE_KEYS)}")
    for k, (required, what) in _TASK_FILE_KEYS.items():
        if k not in d:
            if required:
                raise TaskError(f"task file {file}: missing key {k!r} ({what})")
            continue
        v, choices = d[k], {"metric": METRICS, "fmt": FORMATS}.get(k)
        if k == "label_names":
            ok = isinstance(v, list) and len(v) >= 2 and all(isinstance(x, str) for x in v)
        elif k == "group_by_text":
            ok, what = isinstance(v, bool), f"true or false ({what})"
        elif choices:
            ok = isinstance(v, str) and v in choices
        else:
            ok, what = isinstance(v, str) and v.strip() != "", f"a non-empty string ({what})"
        if not ok:
            raise TaskError(f"task file {file}: key {k!r} must be {what}; got {v!r}")

    def data_file(k: str) -> Path | None:
        if k not in d:
            return None
        p = Path(d[k]).expanduser()
        return p if p.is_absolute() else file.parent / p

    try:
        return task_from_file(d["name"], data_file("train"), text_a=d["text_a"], label=d["label"],
                              text_b=d.get("text_b"), dev_path=data_file("dev"), test_path=data_file("test"),
                              label_names=d.get("label_names"), metric=d["metric"], fmt=d.get("fmt"),
                              group_by_text=d.get("group_by_text", False))
    except TaskError as e:
        raise type(e)(f"task file {file}: {e}") from None


def metric_name(task: str | TaskSpec) -> str:
    """``"accuracy"`` or ``"f1"`` (binary F1 of label 1)."""
    return get_task(task).metric


def compute_metric(task: str | TaskSpec, preds: Any, labels: Any) -> float:
    """The task's metric in [0, 1]: accuracy, or F1 of the positive class (label 1)."""
    p = np.asarray(preds).reshape(-1).astype(np.int64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if p.shape != y.shape:
        raise TaskError(f"preds and labels differ in length: {p.size} vs {y.size}")
    if y.size == 0:
        raise TaskError("no examples to score")
    if (y < 0).any():
        raise TaskError("labels contain -1 (unlabelled test file); score against a labelled file")
    if metric_name(task) == "accuracy":
        return float((p == y).mean())
    tp = int(((p == 1) & (y == 1)).sum())
    denom = 2 * tp + int(((p == 1) & (y != 1)).sum()) + int(((p != 1) & (y == 1)).sum())
    return 2 * tp / denom if denom else 0.0
