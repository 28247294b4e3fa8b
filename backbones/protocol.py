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

Tasks whose rows can share text (``TaskSpec.group_by_text``: SST-2's training rows are
phrases of parsed sentences, many of them spans of one another) are split by *text group*
(:func:`text_groups`): a phrase goes with the longest phrase containing it, the subset,
holdout and folds take whole groups, and a held-out row whose text is still a span of a
fitted row's text is dropped, so no calib text is contained in a fit text.

Everything here is plain index arithmetic on the train split's labels (and texts); nothing
is read or written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

PROTOCOLS = ("holdout", "crossfit")
HOLDOUT = 0.3  # fraction of train held out for calib (holdout protocol)
FOLDS = 3  # folds of the crossfit protocol
CALIB_ROWS = 4000  # at most this many spare rows become calib rows
MIN_SPARE = 1000  # spare rows needed before a task takes its calib rows from them instead of holding out
MIN_CALIB_ROWS = 10  # fewest held-out (calib) rows a partition may leave: each calib half (calib-a/-b) gets 5
DEFAULT_PROTOCOL: dict[str, str] = {}  # per task; tasks not listed use "holdout"


def default_protocol(task: str) -> str:
    """The calib protocol a task uses unless told otherwise."""
    return DEFAULT_PROTOCOL.get(task, "holdout")


@dataclass(frozen=True)
class Partition:
    """Row indices into the full train split: what one backbone fits, and what it never sees."""

    fit: np.ndarray
    held_out: np.ndarray


def subset_rows(n: int, max_train_samples: int | None, seed: int,
                sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pool, spare): the training subset a task's backbone draws from, and the rows left out.

    The subset is the first ``max_train_samples`` rows of a seeded permutation (the
    order ``datasets.Dataset.shuffle(seed)`` uses); no limit keeps every row in order.
    With ``sizes`` the ``n`` units are groups of that many rows: the subset is the
    permuted groups while their rows add up to at most ``max_train_samples``.
    """
    total = n if sizes is None else int(np.sum(sizes))
    if not max_train_samples or total <= max_train_samples:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng(seed).permutation(n)
    k = max_train_samples if sizes is None else int(np.searchsorted(np.cumsum(np.asarray(sizes)[perm]),
                                                                    max_train_samples, side="right"))
    return perm[:k], perm[k:]


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
              holdout: float = 0.0, folds: int = 0, fold: int = 0,
              texts: Sequence[str] | None = None) -> Partition:
    """The rows one backbone fits and the rows it never sees.

    ``holdout`` > 0 holds out that stratified fraction of the pool; ``folds`` > 0 holds
    out fold ``fold`` of ``folds``; neither: the backbone fits the whole pool and the
    spare rows (if a subset was drawn) are its held-out rows. With ``texts`` (one per row)
    every step takes whole text groups (:func:`text_groups`) instead of rows, and held-out
    rows whose text is a span of a fitted text are dropped; when no text contains another
    the partition is the one without ``texts``.
    """
    labels = np.asarray(labels)
    if holdout and folds:
        raise ValueError("pass holdout or folds, not both")
    if folds and not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}; got {fold}")
    if texts is None:
        return _split(labels, None, seed, max_train_samples, holdout, folds, fold)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts for {len(labels)} labels")
    group, outer, inner = text_groups(tuple(texts))
    first = np.unique(group, return_index=True)[1]  # groups are numbered in order of their first row
    sizes = np.bincount(group)
    part = _split(labels[first], sizes, seed, max_train_samples, holdout, folds, fold)
    fit, held = _rows_of(group, part.fit), _rows_of(group, part.held_out)
    in_fit = np.zeros(len(labels), dtype=bool)
    in_fit[fit] = True
    spans_of_fit = np.zeros(len(labels), dtype=bool)
    spans_of_fit[inner[in_fit[outer]]] = True
    held = held[~spans_of_fit[held]]
    # Held-out rows go round-robin over their groups (each group's longest text first), so that a capped
    # calib set (CALIB_ROWS) spreads over as many source texts as it can instead of a few groups' spans.
    length = np.fromiter((len(normalise_text(t)) for t in texts), dtype=np.int64, count=len(texts))
    by_group = np.lexsort((held, -length[held], group[held]))  # held rows grouped, longest first
    g_sorted = group[held][by_group]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    turn = np.empty(len(held), dtype=np.int64)  # a row's place within its group
    turn[by_group] = np.arange(len(held)) - np.repeat(starts, np.diff(np.r_[starts, len(held)]))
    seen, first_at = np.unique(group[held], return_index=True)
    place = np.zeros(group.max() + 1, dtype=np.int64)  # a group's place in the held-out order
    place[seen] = first_at
    return Partition(fit=fit, held_out=held[np.lexsort((place[group[held]], turn))])


def _split(labels: np.ndarray, sizes: np.ndarray | None, seed: int, max_train_samples: int | None, holdout: float,
           folds: int, fold: int) -> Partition:
    """:func:`partition` over units (rows, or text groups of ``sizes`` rows each, ``labels`` one per unit)."""
    pool, spare = subset_rows(len(labels), max_train_samples, seed, sizes)
    if len(np.unique(labels[pool])) < 2:
        raise ValueError(f"the training rows ({len(pool)}) hold a single class, {labels[pool][:1].tolist()}; "
                         "a classifier needs rows of at least 2 classes")
    held = math.ceil(holdout * len(pool)) if holdout else len(pool) // folds if folds else len(spare)
    if (holdout or folds) and held < MIN_CALIB_ROWS:
        need = math.ceil(MIN_CALIB_ROWS / holdout) if holdout else MIN_CALIB_ROWS * folds
        raise ValueError(f"{len(pool)} training rows are too few to hold out calib rows: at least {MIN_CALIB_ROWS} "
                         f"must be held out, so this needs at least {need} rows "
                         f"({'--holdout ' + format(holdout, 'g') if holdout else str(folds) + ' folds'})")
    if folds:
        f = fold_ids(labels[pool], folds, seed)
        part = Partition(fit=pool[f != fold], held_out=pool[f == fold])
    elif holdout:
        m = holdout_mask(labels[pool], holdout, seed)
        part = Partition(fit=pool[~m], held_out=pool[m])
    else:
        part = Partition(fit=pool, held_out=spare)
    for side, rows in (("fit", part.fit), ("held-out (calib)", part.held_out)):
        if (len(rows) or side == "fit") and len(np.unique(labels[rows])) < 2:
            raise ValueError(f"the {side} rows hold a single class: add rows of the other classes (each class "
                             "needs rows on both sides of the split)")
    return part


def _rows_of(group: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The rows of ``groups``, group by group in that order (rows of one group in file order)."""
    rank = np.full(group.max() + 1 if len(group) else 0, len(groups), dtype=np.int64)
    rank[groups] = np.arange(len(groups))
    r = rank[group]
    order = np.argsort(r, kind="stable")
    return order[: int((r < len(groups)).sum())]


def normalise_text(text: str) -> str:
    """Lower case, runs of whitespace as one space: the form texts are compared in."""
    return " ".join(text.lower().split())


@lru_cache(maxsize=4)
def text_groups(texts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group, outer, inner): every row's text group, and every pair of rows whose (normalised) texts
    contain one another: ``texts[inner[i]]`` is a contiguous word span of ``texts[outer[i]]`` (each
    text contains itself). A row's group is the longest text containing it (the first such row on
    ties), numbered 0.. in order of first row; identical texts share a group.

    Every contiguous word span of every text is looked up in a table of the texts (SST-2's 67k
    training phrases: about 5 million look-ups, a few seconds; remembered for the last 4 inputs).
    """
    norm = [normalise_text(t) for t in texts]
    index: dict[str, list[int]] = {}
    for i, t in enumerate(norm):
        index.setdefault(t, []).append(i)
    max_words = max((t.count(" ") + 1 for t in index), default=0)
    outer: list[int] = []
    inner: list[int] = []
    for i, t in enumerate(norm):
        starts = [0] + [m + 1 for m, c in enumerate(t) if c == " "]
        ends = [s - 1 for s in starts[1:]] + [len(t)]
        n = len(starts)
        for a in range(n):
            for b in range(a, min(n, a + max_words)):
                hit = index.get(t[starts[a]:ends[b]])
                if hit is not None:
                    outer.extend([i] * len(hit))
                    inner.extend(hit)
    outer_a, inner_a = np.asarray(outer, dtype=np.int64), np.asarray(inner, dtype=np.int64)
    length = np.array([len(t) for t in norm], dtype=np.int64)
    # for each inner row, its longest container (ties: the first row)
    order = np.lexsort((outer_a, -length[outer_a], inner_a))
    first = np.ones(len(order), dtype=bool)
    first[1:] = inner_a[order][1:] != inner_a[order][:-1]
    root = np.empty(len(norm), dtype=np.int64)
    root[inner_a[order][first]] = outer_a[order][first]
    _, group = np.unique(root, return_inverse=True)
    # renumber groups in order of their first row
    firsts = np.unique(group, return_index=True)[1]
    renum = np.empty_like(firsts)
    renum[np.argsort(firsts)] = np.arange(len(firsts))
    return renum[group].astype(np.int64), outer_a, inner_a


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
