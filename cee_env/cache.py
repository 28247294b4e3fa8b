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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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


class CacheError(RuntimeError):
    """A cache on disk is missing, corrupt or does not match what was asked for."""


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def fingerprint(checkpoint: Path, task: str, split: str, data_file: str, max_length: int, limit: int | None) -> str:
    """What a cache depends on: checkpoint weights, task, split and its data, max length, format version."""
    from backbones.multiexit import WEIGHTS_NAME

    parts = {
        "weights": _sha256_file(Path(checkpoint) / WEIGHTS_NAME),
        "task": task, "split": split, "data": data_file, "max_length": max_length,
        "limit": limit, "format": FORMAT_VERSION,
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
    """Write arrays then meta.json, each atomically; meta.json last marks the cache complete."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_VERSION, "fingerprint": cache.fingerprint, "task": cache.task, "split": cache.split,
            "label_names": list(cache.label_names), "metric": cache.metric, "meta": cache.meta, "arrays": {}}
    for name in _ARRAYS:
        arr = np.ascontiguousarray(getattr(cache, name))
        tmp = folder / f"{name}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, folder / f"{name}.npy")
        meta["arrays"][name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "checksum": _checksum(arr)}
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")


def load_cache(folder: Path, expect_fingerprint: str | None = None, verify_states: bool = False) -> LayerCache:
    """Memory-map a cache; raise :class:`CacheError` if it is incomplete, corrupt or not the one expected.

    Shapes, dtypes and the checksums of labels and log-probabilities are always
    checked; the (large) states too when ``verify_states``.
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
        arrays[name] = np.asarray(arr)  # a plain ndarray view of the map: indexing a np.memmap subclass is slow
    return LayerCache(**arrays, task=meta["task"], split=meta["split"], label_names=tuple(meta["label_names"]),
                      metric=meta["metric"], fingerprint=meta["fingerprint"], meta=meta["meta"])


def load_if_usable(folder: Path, fp: str) -> LayerCache | None:
    """The cache in ``folder`` if it exists and matches ``fp``; None (with a message) if it must be built."""
    if not folder.exists():
        return None
    try:
        return load_cache(folder, fp)
    except CacheError as e:
        print(f"cache {folder} is unusable ({e}); rebuilding it")
        return None


def build_cache(model, tokenizer, ds, *, task: str, split: str, label_names, metric: str, max_length: int,
                fingerprint_: str = "", batch_size: int = 64, meta: dict | None = None) -> LayerCache:
    """Run a multi-exit model once over a dataset: states, log-probs, labels for every layer."""
    from backbones.data import Encoded, run_all_layers

    enc = Encoded(ds, tokenizer, max_length)
    logp, states = run_all_layers(model, enc, batch_size, states=True, desc=f"caching {task}/{split}")
    return LayerCache(states=states.astype(np.float32), log_probs=logp.astype(np.float32), labels=enc.labels,
                      task=task, split=split, label_names=tuple(label_names), metric=metric,
                      fingerprint=fingerprint_, meta=dict(meta or {}))


def get_cache(task: str, split: str = "train", checkpoint: str | os.PathLike | None = None,
              data_dir: str | None = None, test_file: str | None = None, data_file: str | None = None,
              rebuild: bool = False, batch_size: int = 64, verbose: bool = True) -> LayerCache:
    """The layer cache of ``task``/``split`` under a stage-1 checkpoint, built on first use.

    ``checkpoint`` defaults to the task's default stage-1 checkpoint (trained if
    missing). ``test_file`` (for split "test") or ``data_file`` (any split)
    read the split from a file path. Caches live in ``runs/cache/<task>/`` keyed
    by a fingerprint; a corrupt or mismatched cache is rebuilt, never used.
    """
    from backbones import tasks as T
    from backbones.multiexit import MultiExitEncoder, load_tokenizer
    from backbones.paths import runs_dir
    from backbones.train import ensure_checkpoint

    spec = T.get_task(task)
    ckpt = Path(checkpoint) if checkpoint else ensure_checkpoint(spec.name, data_dir=data_dir)
    path = data_file or (test_file if split == "test" else None)
    ds = T.load_split(spec, split, data_dir=data_dir, path=path)
    cfg = json.loads((ckpt / "multiexit.json").read_text())
    limit = None
    if split == "train" and (ckpt / "train_config.json").is_file():
        tc = json.loads((ckpt / "train_config.json").read_text())
        limit = tc.get("max_train_samples")
        if limit and len(ds) > limit:  # the same subset the checkpoint was trained on
            ds = ds.shuffle(seed=tc["seed"]).select(range(limit))
    src = str(Path(path).resolve()) if path else f"{spec.name}:{split}:{_split_file_id(spec, split, data_dir)}"
    fp = fingerprint(ckpt, spec.name, split, src, cfg["max_length"], limit)
    folder = runs_dir() / "cache" / spec.name / f"{split}-{fp[:16]}"
    if not rebuild and (cached := load_if_usable(folder, fp)) is not None:
        return cached
    if verbose:
        print(f"building the layer cache for {spec.name}/{split} ({len(ds)} instances) from {ckpt}")
    model = MultiExitEncoder.load(ckpt)
    cache = build_cache(model, load_tokenizer(ckpt), ds, task=spec.name, split=split, label_names=spec.label_names,
                        metric=spec.metric, max_length=cfg["max_length"], fingerprint_=fp, batch_size=batch_size,
                        meta={"checkpoint": str(ckpt), "source": src, "pooling": cfg["pooling"]})
    save_cache(cache, folder)
    return load_cache(folder, fp)


def _split_file_id(spec, split: str, data_dir: str | None) -> str:
    """Size and mtime of the split's file(s), so an edited data file invalidates the cache."""
    from backbones.paths import data_dir as resolve_dir

    rel = spec.splits.get(split)
    if rel is None:
        return "none"
    p = Path(rel) if Path(rel).is_absolute() else resolve_dir(data_dir) / rel  # user tasks hold absolute paths
    st = p.stat() if p.exists() else None
    return f"{p}:{st.st_size}:{int(st.st_mtime)}" if st else str(p)
