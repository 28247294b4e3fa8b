"""The fit / calib / test protocol: partitions, and calib caches built from rows a backbone never saw."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import N_TRAIN, TINY_TASK, TINY_TRAIN

import backbones.train as tr
from backbones import protocol as P
from backbones import tasks as T
from backbones.data import Encoded, run_all_layers
from backbones.multiexit import MultiExitEncoder, load_tokenizer
from cee_env.cache import CacheError, get_cache


def test_holdout_is_stratified_disjoint_and_seeded():
    labels = np.array([0] * 70 + [1] * 30)
    part = P.partition(labels, seed=0, holdout=0.3)
    assert len(part.held_out) == 30 and len(part.fit) == 70
    assert set(part.fit).isdisjoint(part.held_out) and set(part.fit) | set(part.held_out) == set(range(100))
    assert (labels[part.held_out] == 1).sum() == 9, "30% of each class"
    np.testing.assert_array_equal(part.held_out, P.partition(labels, seed=0, holdout=0.3).held_out)
    assert set(P.partition(labels, seed=1, holdout=0.3).held_out) != set(part.held_out)


def test_folds_cover_every_row_once_and_are_stratified():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 2)  # class 2 too rare to stratify: pooled
    held = [P.partition(labels, seed=0, folds=3, fold=k).held_out for k in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(held)), np.arange(len(labels)))
    for k, h in enumerate(held):
        fit = P.partition(labels, seed=0, folds=3, fold=k).fit
        assert set(fit).isdisjoint(h) and len(fit) + len(h) == len(labels)
        assert (labels[h] == 1).sum() == 10
    with pytest.raises(ValueError, match="fold must be in 0..2"):
        P.partition(labels, folds=3, fold=3)


def test_subset_tasks_hold_out_their_spare_rows():
    labels = np.arange(5000) % 2
    part = P.partition(labels, seed=0, max_train_samples=3000)
    assert len(part.fit) == 3000 and len(part.held_out) == 2000
    assert set(part.fit).isdisjoint(part.held_out)
    assert P.has_spare(5000, 3000) and not P.has_spare(3500, 3000) and not P.has_spare(5000, None)
    assert P.checkpoint_suffix() == "" and P.checkpoint_suffix(holdout=0.3) == "-holdout0.3"
    assert P.checkpoint_suffix(folds=3, fold=1) == "-fold1of3"


def _run(ckpt, rows):
    model = MultiExitEncoder.load(ckpt)
    ds = T.load_split(TINY_TASK, "train").select(rows)
    return run_all_layers(model, Encoded(ds, load_tokenizer(ckpt), 32), 16, states=True)


def test_holdout_checkpoint_trains_without_its_calib_rows(tmp_runs, tiny_task, tiny_encoder_dir):
    ckpt = tr.train(tr.TrainConfig(task=TINY_TASK, model=str(tiny_encoder_dir), holdout=0.25, save_every=0,
                                   **{**TINY_TRAIN, "epochs": 1}))
    assert ckpt.name.endswith("-holdout0.25")
    labels = np.asarray(T.load_split(TINY_TASK, "train")["label"])
    part = P.partition(labels, seed=0, holdout=0.25)
    calib = get_cache(TINY_TASK, "calib", checkpoint=ckpt, verbose=False)
    train = get_cache(TINY_TASK, "train", checkpoint=ckpt, verbose=False)
    assert calib.num_instances == N_TRAIN // 4 and train.num_instances == N_TRAIN - N_TRAIN // 4
    assert calib.meta["rows"] == sorted(part.held_out.tolist())
    np.testing.assert_array_equal(calib.labels, labels[np.sort(part.held_out)])
    logp, states = _run(ckpt, np.sort(part.held_out))
    np.testing.assert_allclose(calib.log_probs, logp, rtol=1e-5, atol=1e-6)
    correct = np.load(ckpt / "train_correct.npy")
    assert correct.shape[1] == len(part.fit), "stage 1 saw only the fit rows"


def test_crossfit_calib_is_out_of_fold(tmp_runs, tiny_task, tiny_encoder_dir, capsys):
    full = tr.train(tr.TrainConfig(task=TINY_TASK, model=str(tiny_encoder_dir), save_every=0,
                                   **{**TINY_TRAIN, "epochs": 1}))
    calib = get_cache(TINY_TASK, "calib", checkpoint=full, verbose=False)  # trains the 3 fold backbones
    assert calib.num_instances == N_TRAIN and calib.split == "calib"
    assert calib.meta["rows"] == list(range(N_TRAIN))
    labels = np.asarray(T.load_split(TINY_TASK, "train")["label"])
    np.testing.assert_array_equal(calib.labels, labels)
    folds = [full.parent / f"{full.name}-fold{k}of{P.FOLDS}" for k in range(P.FOLDS)]
    assert calib.meta["fold_checkpoints"] == [str(f) for f in folds]
    for k, fk in enumerate(folds):
        tc = json.loads((fk / "train_config.json").read_text())
        assert (tc["folds"], tc["fold"], tc["epochs"]) == (P.FOLDS, k, 1), "fold backbones copy the full one's config"
        held = np.sort(P.partition(labels, seed=0, folds=P.FOLDS, fold=k).held_out)
        logp, _ = _run(fk, held)
        np.testing.assert_allclose(calib.log_probs[held], logp, rtol=1e-5, atol=1e-6)
    with pytest.raises(CacheError, match="fold 0 of 3"):
        get_cache(TINY_TASK, "calib", checkpoint=folds[0], verbose=False)


def _spans(text: str) -> set[str]:
    w = P.normalise_text(text).split(" ")
    return {" ".join(w[a:b]) for a in range(len(w)) for b in range(a + 1, len(w) + 1)}


def _calib_texts_inside_fit(texts, part, cap=None) -> list[str]:
    """Held-out texts (the first ``cap``) that are contiguous word spans of some fitted text: by brute force."""
    inside = set().union(*(_spans(texts[r]) for r in part.fit))
    return [texts[r] for r in part.held_out[:cap] if P.normalise_text(texts[r]) in inside]


def _phrase_rows(n_sentences: int, seed: int) -> tuple[list[str], np.ndarray]:
    """SST-2-like rows: whole sentences plus several of their contiguous spans, shuffled together."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(40)]
    texts, labels = [], []
    for s in range(n_sentences):
        sent = list(rng.choice(words, size=rng.integers(4, 12)))
        texts.append(" ".join(sent))
        for _ in range(rng.integers(0, 6)):
            a = int(rng.integers(0, len(sent)))
            b = int(rng.integers(a + 1, len(sent) + 1))
            texts.append(("  " if rng.random() < 0.3 else "") + " ".join(sent[a:b]).upper())  # case and spacing differ
        labels += [s % 2] * (len(texts) - len(labels))
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.asarray(labels)[order]


@pytest.mark.parametrize("kw", [dict(max_train_samples=300), dict(holdout=0.3), dict(folds=3, fold=1)])
def test_text_groups_keep_spans_of_a_text_on_its_side(kw):
    texts, labels = _phrase_rows(200, seed=0)
    by_row = P.partition(labels, seed=0, **kw)
    assert _calib_texts_inside_fit(texts, by_row), "the row-level split puts spans of fit texts into calib"
    part = P.partition(labels, seed=0, texts=texts, **kw)
    assert _calib_texts_inside_fit(texts, part) == []
    assert set(part.fit).isdisjoint(part.held_out)
    if "max_train_samples" in kw:
        assert len(part.fit) <= 300 and len(part.fit) + len(part.held_out) > len(texts) // 2
    # a capped calib set spreads over source texts: its first rows come from distinct groups
    group = P.text_groups(tuple(texts))[0]
    head = part.held_out[:20]
    assert len(set(group[head])) == len(head)
    np.testing.assert_array_equal(part.fit, P.partition(labels, seed=0, texts=texts, **kw).fit)  # seeded


def test_text_groups_without_shared_text_change_nothing():
    texts = [f"sentence number {i}" for i in range(500)]  # no text is a span of another
    labels = np.arange(500) % 2
    for kw in (dict(max_train_samples=300), dict(holdout=0.3), dict(folds=3, fold=2)):
        a, b = P.partition(labels, seed=0, **kw), P.partition(labels, seed=0, texts=texts, **kw)
        np.testing.assert_array_equal(a.fit, b.fit)
        np.testing.assert_array_equal(a.held_out, b.held_out)


def test_text_groups_match_spans_on_whole_words_ignoring_case_and_spacing():
    texts = ("a good movie", "good", "GOOD  movie", "od mo", "a good", "bad", "good movie")
    group, outer, inner = P.text_groups(texts)
    contains = set(zip(outer.tolist(), inner.tolist()))
    assert (0, 1) in contains and (0, 2) in contains and (0, 4) in contains and (2, 6) in contains
    assert (0, 3) not in contains, "spans are whole words"
    assert group[1] == group[2] == group[4] == group[6] == group[0] and group[5] != group[0] and group[3] != group[0]


def test_sst2_holds_out_by_text_group_and_its_checkpoint_is_new():
    assert T.get_task("SST2").group_by_text and not T.get_task("RTE").group_by_text
    assert tr.run_name(tr.TrainConfig(task="SST2").resolved()).endswith("-s0-textgroups")
    assert tr.run_name(tr.TrainConfig(task="RTE").resolved()).endswith("-s0")


@pytest.mark.slow  # reads SST-2's 67k training phrases (~10 s)
def test_sst2_calib_texts_are_never_spans_of_fit_texts():
    ds = T.load_split("SST2", "train")
    texts, labels = ds["text_a"], np.asarray(ds["label"])
    old = P.partition(labels, seed=0, max_train_samples=8000)
    assert len(_calib_texts_inside_fit(texts, old, P.CALIB_ROWS)) > 1000  # the 1,485 of 4,000
    new = P.partition(labels, seed=0, max_train_samples=8000, texts=T.get_task("SST2").partition_texts(ds))
    assert len(new.held_out) >= P.CALIB_ROWS and len(new.fit) <= 8000
    assert _calib_texts_inside_fit(texts, new, P.CALIB_ROWS) == []
