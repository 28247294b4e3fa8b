"""Per-instance, per-layer outputs of a frozen multi-exit backbone, cached on disk.

A :class:`LayerCache` holds, for N instances and L layers:

- ``states``    float32 [N, L, H]: s_l, the pooled state the internal classifier at l reads
- ``log_probs`` float32 [N, L, C]: log p_l(. | x)
- ``labels``    int64   [N]: gold labels (-1 where the split has none)

Predictions, the memorized layer (Eq 7) and the oracle exit are derived from
these. No transformer runs when an environment reads a cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from backbones.files import (IntegrityError, claim, nonfinite, resolve_stored, save_npy, sha256_file, stored_path,
                             write_json)

@dataclass
class LayerCache:
    states: np.ndarray
    log_probs: np.ndarray
    labels: np.ndarray
    task: str = ""
    split: str = ""
    label_names: tuple[str, ...] = ()
    metric: str = "accuracy"
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.states.ndim != 3 or self.log_probs.ndim != 3 or self.labels.ndim != 1:
            raise ValueError(
                "LayerCache expects states [N,L,H], log_probs [N,L,C], labels [N]; got "
                f"{self.states.shape}, {self.log_probs.shape}, {self.labels.shape}"
            )
        n, l, _ = self.states.shape
        if self.log_probs.shape[:2] != (n, l) or self.labels.shape[0] != n:
            raise ValueError(
                f"LayerCache shapes disagree: states {self.states.shape}, "
                f"log_probs {self.log_probs.shape}, labels {self.labels.shape}"
            )

    @property
    def num_instances(self) -> int:
        return self.states.shape[0]

    @property
    def num_layers(self) -> int:
        return self.states.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]

    @property
    def num_classes(self) -> int:
        return self.log_probs.shape[2]

    @property
    def preds(self) -> np.ndarray:
        """int64 [N, L]: argmax prediction of every internal classifier."""
        return self.log_probs.argmax(-1)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all())


# --------------------------------------------------------------------------- building and loading
FORMAT_VERSION = 2
_ARRAYS = ("states", "log_probs", "labels")


class CacheError(ValueError):
    """A cache on disk is missing, corrupt or does not match what was asked for (a ``ValueError``:
    when it cannot be rebuilt, commands report it as one line)."""


_sha256_file = sha256_file
_PATH_KEYS = ("checkpoint", "heads_dir")  # meta entries holding paths: stored relative to runs/ (backbones.files)


def fingerprint(checkpoint: Path, task: str, split: str, data_file: str, max_length: int, rows: str | None) -> str:
    """What a cache depends on: checkpoint weights, task, split, its data (by content), the rows taken
    from it, max length, format version."""
    from backbones.multiexit import weights_sha256

    parts = {
        "weights": weights_sha256(checkpoint),  # checked against the sha256 the checkpoint recorded
        "task": task, "split": split, "data": data_file, "max_length": max_length,
        "rows": rows, "format": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _checksum(a: np.ndarray) -> str:
    """sha256 of the array's bytes (catches any change, including swapped rows)."""
    h = hashlib.sha256()
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    for i in range(0, flat.size, 1 << 26):
        h.update(flat[i:i + (1 << 26)])
    return h.hexdigest()


def save_cache(cache: LayerCache, folder: Path) -> None:
    """Write arrays then meta.json, each atomically (unique temporary names: two writers never clash);
    meta.json last marks the cache complete. NaN or infinite states or log-probabilities are refused
    (:class:`~backbones.files.IntegrityError`): nothing built on bad weights is cached."""
    bad = nonfinite({name: getattr(cache, name) for name in _ARRAYS})
    if bad:
        src = cache.meta.get("checkpoint") or cache.meta.get("heads_dir") or "the model"
        raise IntegrityError(f"refusing to cache {cache.task}/{cache.split}: {', '.join(bad)} hold NaN or infinite "
                             f"values, so the weights of {src} are broken; restore or retrain them")
    meta = {"format": FORMAT_VERSION, "fingerprint": cache.fingerprint, "task": cache.task, "split": cache.split,
            "label_names": list(cache.label_names), "metric": cache.metric,
            "meta": {k: stored_path(v) if k in _PATH_KEYS and v else v for k, v in cache.meta.items()}, "arrays": {}}
    for name in _ARRAYS:
        arr = np.ascontiguousarray(getattr(cache, name))
        save_npy(folder / f"{name}.npy", arr)
        meta["arrays"][name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "checksum": _checksum(arr)}
    write_json(folder / "meta.json", meta)


def load_cache(folder: Path, expect_fingerprint: str | None = None, verify_states: bool = True) -> LayerCache:
    """Memory-map a cache; raise :class:`CacheError` if it is incomplete, corrupt or not the one expected.

    Shapes, dtypes and the sha256 checksums of every array are checked, and the floats for
    NaN/inf (``verify_states=False`` skips the checksum of the large states array: about 5x
    faster on a big cache, but a flipped byte there goes unnoticed).
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{folder}: no readable meta.json ({e})") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CacheError(f"{folder}: format {meta.get('format')} != {FORMAT_VERSION}")
    if expect_fingerprint is not None and meta.get("fingerprint") != expect_fingerprint:
        raise CacheError(f"{folder}: fingerprint does not match the checkpoint/data asked for")
    arrays = {}
    for name in _ARRAYS:
        want = meta["arrays"][name]
        try:
            arr = np.load(folder / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CacheError(f"{folder}/{name}.npy unreadable: {e}") from e
        if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
            raise CacheError(f"{folder}/{name}.npy is {arr.shape} {arr.dtype}, meta says {want['shape']} {want['dtype']}")
        if (name != "states" or verify_states) and _checksum(arr) != want["checksum"]:
            raise CacheError(f"{folder}/{name}.npy checksum mismatch (corrupt)")
        if nonfinite({name: arr}):
            raise CacheError(f"{folder}/{name}.npy holds NaN or infinite values")
        arrays[name] = np.asarray(arr)  # a plain ndarray view of the map: indexing a np.memmap subclass is slow
    inner = {k: str(resolve_stored(v)) if k in _PATH_KEYS and v else v for k, v in meta["meta"].items()}
    return LayerCache(**arrays, task=meta["task"], split=meta["split"], label_names=tuple(meta["label_names"]),
                      metric=meta["metric"], fingerprint=meta["fingerprint"], meta=inner)


def load_if_usable(folder: Path, fp: str, quiet: bool = False) -> LayerCache | None:
    """The cache in ``folder`` if it exists and matches ``fp``; None (with a message unless ``quiet``) if it
    must be built."""
    if not folder.exists():
        return None
    try:
        return load_cache(folder, fp)
    except CacheError as e:
        if not quiet:
            print(f"cache {folder} is unusable ({e}); rebuilding it")
        return None


def build_cache(model, tokenizer, ds, *, task: str, split: str, label_names, metric: str, max_length: int,
                fingerprint_: str = "", batch_size: int = 64, meta: dict | None = None,
                processes=None, scratch: Path | None = None) -> LayerCache | None:
    """Run a multi-exit model once over a dataset: states, log-probs, labels for every layer.

    ``processes`` (accelerate's state of a multi-process launch, :func:`launched_processes`): each process
    runs its share of the batches and writes it under ``scratch`` (a folder all of them see); the main one
    merges them into the cache one process would build (same batches, so the same bytes) and returns it,
    the others return None."""
    from backbones.data import Encoded, run_all_layers

    enc = Encoded(ds, tokenizer, max_length)
    desc = f"caching {task}/{split}"
    if processes is None:
        logp, states = run_all_layers(model, enc, batch_size, states=True, desc=desc)
    elif (merged := _sharded_pass(model, enc, batch_size, processes, Path(scratch), desc)) is None:
        return None
    else:
        logp, states = merged
    return LayerCache(states=states.astype(np.float32), log_probs=logp.astype(np.float32), labels=enc.labels,
                      task=task, split=split, label_names=tuple(label_names), metric=metric,
                      fingerprint=fingerprint_, meta=dict(meta or {}))


def launched_processes():
    """accelerate's ``PartialState`` when this process is one of several started by ``accelerate launch``
    (or torchrun): layer caches are then built by all of them together. None in a plain process
    (accelerate is not imported then)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as accelerate's Accelerator reads it


def _sharded_pass(model, enc, batch_size: int, ps, scratch: Path, desc: str):
    """This process's batches (``backbones.data.shard_rows``) through the model, written to ``scratch``;
    on the main process, every process's rows put back in row order: (log-probs, states). None elsewhere."""
    from backbones.data import run_all_layers

    rank, world = ps.process_index, ps.num_processes
    rows, logp, states = run_all_layers(model.to(ps.device), enc, batch_size, states=True,
                                        desc=desc if ps.is_main_process else None, shard=(rank, world))
    part = lambda r, name: scratch / f"{r}-of-{world}.{name}.npy"  # noqa: E731
    if len(rows):
        save_npy(part(rank, "log_probs"), logp)
        save_npy(part(rank, "states"), states)
    save_npy(part(rank, "rows"), rows)
    ps.wait_for_everyone()
    if not ps.is_main_process:
        return None
    out_logp = out_states = None
    for r in range(world):
        rows = np.load(part(r, "rows"))
        if not len(rows):
            continue
        lp, st = np.load(part(r, "log_probs")), np.load(part(r, "states"))
        if out_logp is None:
            out_logp = np.empty((len(enc), *lp.shape[1:]), lp.dtype)
            out_states = np.empty((len(enc), *st.shape[1:]), st.dtype)
        out_logp[rows], out_states[rows] = lp, st
    shutil.rmtree(scratch, ignore_errors=True)
    return out_logp, out_states


SPLITS = ("train", "calib", "calib-a", "calib-b", "dev", "test")
CALIB_HALVES = ("calib-a", "calib-b")


def get_cache(task: str, split: str = "train", checkpoint: str | os.PathLike | None = None,
              data_dir: str | None = None, test_file: str | None = None, data_file: str | None = None,
              rebuild: bool = False, batch_size: int = 64, verbose: bool = True,
              protocol: str | None = None, model: str | None = None) -> LayerCache:
    """The layer cache of ``task``/``split`` under a stage-1 checkpoint, built on first use.

    Splits: ``train`` (the rows the checkpoint was fitted on), ``calib`` (rows it never
    saw: see :mod:`backbones.protocol`) and its two fixed halves ``calib-a`` / ``calib-b``
    (:func:`calib_half`), ``dev``, ``test`` (``test_file``). ``checkpoint``
    defaults to the task's deployed checkpoint under ``protocol`` for the backbone ``model`` (default
    all-MiniLM-L6-v2; trained if missing: :func:`deployed_checkpoint`). ``data_file`` reads the split from another file. Caches
    live in ``runs/cache/<task>/`` keyed by a fingerprint of the checkpoint's weights, the
    data file's content and the rows taken; a corrupt or mismatched cache is rebuilt.
    """
    from backbones import tasks as T

    spec = T.get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    ckpt = Path(checkpoint) if checkpoint else deployed_checkpoint(spec.name, protocol, data_dir, model)
    if split == "calib":
        return _calib_cache(spec, ckpt, data_dir, data_file, rebuild, batch_size, verbose)
    if split in CALIB_HALVES:
        return calib_half(_calib_cache(spec, ckpt, data_dir, data_file, rebuild, batch_size, verbose), split)
    tc = _train_config(ckpt)
    if split == "train":
        path = data_file or tc.get("train_file")
        ds = T.load_split(spec, "train", data_dir=data_dir, path=path)
        rows = _partition(tc, ds, spec).fit if tc else None
        if tc:
            _check_fit_rows(ckpt, spec, ds, rows, data_dir, path)
    else:
        path = data_file or (test_file if split == "test" else None)
        ds = T.load_split(spec, split, data_dir=data_dir, path=path)
        rows = None
    return _layer_pass(spec, ckpt, split, ds, rows, _data_id(spec, split, data_dir, path),
                       rebuild, batch_size, verbose)


def calib_half(cache: LayerCache, half: str) -> LayerCache:
    """One of two fixed stratified halves of a calib cache (``calib-a`` / ``calib-b``): a policy can learn
    on one half and be calibrated (``agents.calibrate``) on the other, which it never saw."""
    from backbones.protocol import fold_ids

    if half not in CALIB_HALVES:
        raise ValueError(f"half must be one of {CALIB_HALVES}; got {half!r}")
    rows = np.flatnonzero(fold_ids(np.asarray(cache.labels), 2, 0) == CALIB_HALVES.index(half))
    return take_rows(cache, rows, half)


def take_rows(cache: LayerCache, rows: np.ndarray, split: str | None = None) -> LayerCache:
    """The instances ``rows`` of a cache as a cache of their own (in memory), named ``split``; its meta
    names the same data rows (:func:`row_ids`)."""
    rows = np.asarray(rows, dtype=np.int64)
    digest = hashlib.sha256(rows.tobytes()).hexdigest()[:12]
    source, data_rows = row_ids(cache)
    return LayerCache(states=np.ascontiguousarray(cache.states[rows]), log_probs=np.ascontiguousarray(cache.log_probs[rows]),
                      labels=np.asarray(cache.labels)[rows], task=cache.task, split=split or cache.split,
                      label_names=cache.label_names, metric=cache.metric, fingerprint=f"{cache.fingerprint}-rows-{digest}",
                      meta={**cache.meta, "source": source, "rows": data_rows[rows].tolist()})


def row_ids(cache: LayerCache) -> tuple[str, np.ndarray]:
    """Which data rows a cache holds: (the content id of the file they come from, their row indices in it).
    A cache built from a whole file holds rows 0..N-1; one with no source file (synthetic) is its own source."""
    rows = cache.meta.get("rows")
    return (str(cache.meta.get("source") or cache.fingerprint),
            np.arange(cache.num_instances) if rows is None else np.asarray(rows, dtype=np.int64))


def rows_sha256(cache: LayerCache) -> str:
    """sha256 of :func:`row_ids` (source and row indices): equal for caches of the same data rows."""
    source, rows = row_ids(cache)
    return hashlib.sha256(source.encode() + b"\0" + np.sort(rows).astype("<i8").tobytes()).hexdigest()


def deployed_checkpoint(task: str, protocol: str | None = None, data_dir: str | None = None,
                        model: str | None = None, seed: int | None = None, train_missing: bool = True) -> Path:
    """The stage-1 checkpoint a task deploys under ``protocol`` (default: the task's) for the backbone
    ``model`` (default all-MiniLM-L6-v2; all-mpnet-base-v2, smollm2 or any Hugging Face path), trained if missing
    (``train_missing=False``: ``FileNotFoundError`` naming the command that trains it).

    ``holdout``: the backbone fitted on train minus a stratified held-out fraction (the
    calib rows), unless the task trains on a subset and has spare rows for calib;
    ``crossfit``: the backbone fitted on every training row (calib comes from the folds).
    """
    from backbones import protocol as P
    from backbones.train import ensure_checkpoint, trained_checkpoint

    protocol = protocol or P.default_protocol(task)
    if protocol not in P.PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(P.PROTOCOLS)}")
    get = ensure_checkpoint if train_missing else trained_checkpoint
    if protocol == "holdout" and not _task_has_spare(task, data_dir):
        return get(task, data_dir=data_dir, holdout=P.HOLDOUT, model=model, seed=seed)
    return get(task, data_dir=data_dir, model=model, seed=seed)


def _task_has_spare(task: str, data_dir: str | None) -> bool:
    from backbones import protocol as P
    from backbones import tasks as T
    from backbones.train import TrainConfig

    limit = TrainConfig(task=task).resolved().max_train_samples
    return bool(limit) and P.has_spare(len(T.load_split(task, "train", data_dir=data_dir)), limit)


def _train_config(ckpt: Path) -> dict:
    f = Path(ckpt) / "train_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _partition(tc: dict, ds, spec):
    from backbones.protocol import partition

    return partition(np.asarray(ds["label"]), seed=tc.get("seed", 0), max_train_samples=tc.get("max_train_samples"),
                     holdout=tc.get("holdout", 0.0), folds=tc.get("folds", 0), fold=tc.get("fold", 0),
                     texts=spec.partition_texts(ds))


def _check_fit_rows(ckpt: Path, spec, ds, fit: np.ndarray, data_dir, path) -> None:
    """The rows the checkpoint's partition fits today must be those it recorded training on."""
    from backbones.train import check_fit_rows, train_file_name

    check_fit_rows(ckpt, ds.select(fit), train_file_name(spec.name, data_dir, path))


def _calib_cache(spec, ckpt: Path, data_dir, data_file, rebuild, batch_size, verbose) -> LayerCache:
    """Layer outputs of training rows ``ckpt`` never saw: its held-out rows, else out-of-fold outputs."""
    from backbones import protocol as P
    from backbones import tasks as T
    from backbones.train import TrainConfig, ensure_checkpoint

    tc = _train_config(ckpt)
    if not tc:
        raise CacheError(f"{ckpt} has no train_config.json, so which training rows it saw is unknown; "
                         "calib needs a checkpoint trained by backbones.train")
    if tc.get("folds"):
        raise CacheError(f"{ckpt} is cross-fitting fold {tc['fold']} of {tc['folds']}; "
                         "pass the checkpoint trained on every row (its calib split is built from the folds)")
    path = data_file or tc.get("train_file")
    ds = T.load_split(spec, "train", data_dir=data_dir, path=path)
    data_id = _data_id(spec, "train", data_dir, path)
    part = _partition(tc, ds, spec)
    _check_fit_rows(ckpt, spec, ds, part.fit, data_dir, path)
    held = part.held_out
    if len(held):  # holdout, or the spare rows of a subset (capped)
        return _layer_pass(spec, ckpt, "calib", ds, np.sort(held[: P.CALIB_ROWS]), data_id, rebuild, batch_size, verbose)
    parts, folds = [], P.FOLDS
    known = {f.name for f in fields(TrainConfig)}  # configs written by older versions may hold other keys
    keep = {k: v for k, v in tc.items() if k in known and k not in ("task", "out", "holdout", "folds", "fold")}
    for k in range(folds):
        fk = ensure_checkpoint(spec.name, **{**keep, "folds": folds, "fold": k,
                                             "out": str(ckpt.parent / (ckpt.name + P.checkpoint_suffix(folds=folds, fold=k)))})
        rows = np.sort(_partition({**tc, "folds": folds, "fold": k}, ds, spec).held_out)
        parts.append((rows, _layer_pass(spec, fk, "calib", ds, rows, data_id, rebuild, batch_size, verbose)))
    rows = np.concatenate([r for r, _ in parts])
    order = np.argsort(rows, kind="stable")
    cat = lambda name: np.concatenate([np.asarray(getattr(c, name)) for _, c in parts])[order]  # noqa: E731
    first = parts[0][1]
    fp = hashlib.sha256("".join(c.fingerprint for _, c in parts).encode()).hexdigest()
    return LayerCache(states=cat("states"), log_probs=cat("log_probs"), labels=cat("labels"), task=first.task,
                      split="calib", label_names=first.label_names, metric=first.metric, fingerprint=fp,
                      meta={"checkpoint": str(ckpt), "source": data_id, "calib": "crossfit", "folds": folds,
                            "fold_checkpoints": [c.meta["checkpoint"] for _, c in parts], "rows": rows[order].tolist()})


def _layer_pass(spec, ckpt: Path, split: str, ds, rows: np.ndarray | None, data_id: str,
                rebuild: bool, batch_size: int, verbose: bool) -> LayerCache:
    """The cache of ``ckpt`` over ``ds`` (or its ``rows``), loaded when present and intact, else built."""
    from backbones.multiexit import MultiExitEncoder, load_tokenizer, read_config, resolve_device
    from backbones.paths import runs_dir

    cfg = read_config(ckpt)
    rows_id = None
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == len(ds) and (rows == np.arange(len(ds))).all():
            rows = None  # every row, in order
        else:
            rows_id = hashlib.sha256(rows.tobytes()).hexdigest()
            ds = ds.select(rows)
    fp = fingerprint(ckpt, spec.name, split, data_id, cfg["max_length"], rows_id)
    folder = runs_dir() / "cache" / spec.name / f"{split}-{fp[:16]}"

    def encode(ps=None) -> LayerCache | None:
        meta = {"checkpoint": str(ckpt), "source": data_id, "pooling": cfg["pooling"]}
        if rows is not None:
            meta["rows"] = rows.tolist()
        model = MultiExitEncoder.load(ckpt).to(resolve_device())  # $CEE_DEVICE, else CUDA when present
        return build_cache(model, load_tokenizer(ckpt), ds, task=spec.name, split=split,
                           label_names=spec.label_names, metric=spec.metric, max_length=cfg["max_length"],
                           fingerprint_=fp, batch_size=batch_size, meta=meta,
                           processes=ps, scratch=folder.parent / f".{folder.name}.shards")

    if (ps := launched_processes()) is not None:  # under `accelerate launch`: each process encodes a share
        return _build_together(ps, folder, fp, encode, rebuild, f"{spec.name}/{split} ({len(ds)} instances)", verbose)
    if not rebuild and (cached := load_if_usable(folder, fp)) is not None:
        return cached
    with claim(folder, f"the layer cache {spec.name}/{split}"):  # a second builder waits, then loads it
        if not rebuild and (cached := load_if_usable(folder, fp, quiet=True)) is not None:
            return cached
        if verbose:
            print(f"building the layer cache for {spec.name}/{split} ({len(ds)} instances) from {ckpt}")
        save_cache(encode(), folder)
    return load_cache(folder, fp)


def _build_together(ps, folder: Path, fp: str, encode, rebuild: bool, what: str, verbose: bool) -> LayerCache:
    """:func:`_layer_pass` in one of several processes: the main one holds the lock and decides whether the
    cache must be built (the others may not see the same files), all of them encode their share
    (``encode(ps)``), the main one writes the merged cache; then every process loads it."""
    from accelerate.utils import broadcast_object_list

    with claim(folder, f"the layer cache {what}") if ps.is_main_process else nullcontext():
        build = ps.is_main_process and (rebuild or load_if_usable(folder, fp) is None)
        if broadcast_object_list([build])[0]:
            if verbose and ps.is_main_process:
                print(f"building the layer cache for {what} on {ps.num_processes} processes")
            cache = encode(ps)
            if ps.is_main_process:
                save_cache(cache, folder)
        ps.wait_for_everyone()
    return load_cache(folder, fp)


def _data_id(spec, split: str, data_dir: str | None, path: str | None) -> str:
    """The content (sha256) of the file(s) a split is read from: an edited file is new data."""
    from backbones.paths import data_dir as resolve_dir

    if path:
        files = [Path(path).expanduser().resolve()]
    else:
        rel = spec.splits.get(split)
        if rel is None:
            return f"{spec.name}:{split}:none"
        base = None if Path(rel).is_absolute() else resolve_dir(data_dir)
        files = [Path(rel) if base is None else base / rel]
        if split == "train" and spec.exclude_pairs:
            files.append(base / spec.exclude_pairs if base is not None else Path(spec.exclude_pairs))
    return f"{spec.name}:{split}:" + ",".join(_sha256_file(f) for f in files)
