"""Data roles: which training rows the backbone *fits*, which it never sees (*calib*).

Early-exit rules are learned and tuned on layer outputs. Outputs of rows the
backbone was trained on are over-confident (RTE layer 4: right on 85% of its
training rows, 59% of dev), so a rule tuned on them exits too early on new data.
Three roles keep that apart:

- **fit**: the rows stage-1 training (Eq 1) sees;
- **calib**: rows whose layer outputs look like test-time outputs, where exit
  policies, heads, thresholds and alphas are learned and chosen;
- **test**: reported once, never read while choosing (GLUE dev for the GLUE
  tasks, the task's dev file for M-CID / StackOverflow, any labelled test file).

How calib rows are obtained (:func:`partition`):

- ``spare``: tasks trained on a subset of a large train file (SST-2, StackOverflow)
  take calib rows from the rows the subset left out; the backbone is unchanged.
- ``holdout``: a stratified fraction of the train file is held out; the backbone
  trains on the rest.
- ``crossfit``: K stratified folds; backbone k trains on every fold but k, and
  fold k's calib outputs come from backbone k (out-of-fold). The deployed
  backbone trains on every row, so every training row gets calib outputs at the
  cost of K extra backbones.

Everything here is plain index arithmetic on the train split's labels; nothing
is read or written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROTOCOLS = ("holdout", "crossfit")
HOLDOUT = 0.3  # fraction of train held out for calib (holdout protocol)
FOLDS = 3  # folds of the crossfit protocol
CALIB_ROWS = 4000  # at most this many spare rows become calib rows
MIN_SPARE = 1000  # spare rows needed before a task takes its calib rows from them instead of holding out
DEFAULT_PROTOCOL: dict[str, str] = {}  # per task; tasks not listed use "holdout"


def default_protocol(task: str) -> str:
    """The calib protocol a task uses unless told otherwise."""
    return DEFAULT_PROTOCOL.get(task, "holdout")


@dataclass(frozen=True)
class Partition:
    """Row indices into the full train split: what one backbone fits, and what it never sees."""

    fit: np.ndarray
    held_out: np.ndarray


def subset_rows(n: int, max_train_samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, spare): the training subset a task's backbone draws from, and the rows left out.

    The subset is the first ``max_train_samples`` rows of a seeded permutation (the
    order ``datasets.Dataset.shuffle(seed)`` uses); no limit keeps every row in order.
    """
    if not max_train_samples or n <= max_train_samples:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:max_train_samples], perm[max_train_samples:]


def fold_ids(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified fold id (0..folds-1) of every row (scikit-learn's StratifiedKFold, shuffled)."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    if folds < 2:
        raise ValueError(f"folds must be >= 2; got {folds}")
    ids = np.empty(len(labels), dtype=np.int64)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(skf.split(np.zeros(len(labels)), _stratum(labels, folds))):
        ids[held] = k
    return ids


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool [N]: a stratified ``fraction`` of the rows, held out (scikit-learn's train_test_split)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1); got {fraction}")
    idx = np.arange(len(labels))
    _, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=_stratum(labels, 2))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def _stratum(labels: np.ndarray, min_count: int) -> np.ndarray:
    """Labels to stratify on; classes with fewer than ``min_count`` rows are pooled into one stratum."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    rare = set(values[counts < min_count].tolist())
    return np.array([-1 if y in rare else y for y in labels.tolist()])


def partition(labels: np.ndarray, *, seed: int = 0, max_train_samples: int | None = None,
              holdout: float = 0.0, folds: int = 0, fold: int = 0) -> Partition:
    """The rows one backbone fits and the rows it never sees.

    ``holdout`` > 0 holds out that stratified fraction of the pool; ``folds`` > 0 holds
    out fold ``fold`` of ``folds``; neither: the backbone fits the whole pool and the
    spare rows (if a subset was drawn) are its held-out rows.
    """
    labels = np.asarray(labels)
    pool, spare = subset_rows(len(labels), max_train_samples, seed)
    if holdout and folds:
        raise ValueError("pass holdout or folds, not both")
    if folds:
        if not 0 <= fold < folds:
            raise ValueError(f"fold must be in 0..{folds - 1}; got {fold}")
        f = fold_ids(labels[pool], folds, seed)
        return Partition(fit=pool[f != fold], held_out=pool[f == fold])
    if holdout:
        m = holdout_mask(labels[pool], holdout, seed)
        return Partition(fit=pool[~m], held_out=pool[m])
    return Partition(fit=pool, held_out=spare)


def has_spare(n: int, max_train_samples: int | None) -> bool:
    """Does a task trained on ``max_train_samples`` of ``n`` rows leave enough rows for calib?"""
    return bool(max_train_samples) and n - max_train_samples >= MIN_SPARE


def checkpoint_suffix(holdout: float = 0.0, folds: int = 0, fold: int = 0) -> str:
    """What a checkpoint's folder name adds for a partition ('' for the full pool)."""
    if folds:
        return f"-fold{fold}of{folds}"
    if holdout:
        return f"-holdout{holdout:g}"
    return ""
