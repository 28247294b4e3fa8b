"""Tests for cee_env.cache on the tiny task and the session's tiny stage-1 checkpoint (see conftest.py)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import N_DEV, N_TRAIN, TINY_TASK, register_tiny_task

import cee_env
from backbones import tasks as T
from backbones.data import Encoded, run_all_layers
from backbones.multiexit import MultiExitEncoder, load_tokenizer
from cee_env.cache import CacheError, LayerCache, fingerprint, get_cache, load_cache, save_cache


def cache_folders(runs):
    return sorted(p for p in (runs / "cache" / TINY_TASK).iterdir() if p.is_dir())


def test_get_cache_builds_right_shapes_and_values(tmp_runs, ckpt):
    dev = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    assert isinstance(dev, LayerCache)
    assert dev.states.shape == (N_DEV, 2, 32) and dev.log_probs.shape == (N_DEV, 2, 2) and dev.labels.shape == (N_DEV,)
    assert dev.states.dtype == np.float32 and dev.log_probs.dtype == np.float32 and dev.labels.dtype == np.int64
    assert (dev.task, dev.split, dev.label_names, dev.metric) == (TINY_TASK, "dev", ("neg", "pos"), "accuracy")
    assert len(dev.fingerprint) == 64 and dev.meta["pooling"] == "cls" and dev.has_labels
    assert isinstance(dev.states.base, np.memmap), "caches are memory-mapped (a plain view of the map)"
    np.testing.assert_allclose(np.exp(dev.log_probs).sum(-1), 1.0, rtol=1e-5)

    # the same numbers as running the checkpoint directly
    model = MultiExitEncoder.load(ckpt)
    enc = Encoded(T.load_split(TINY_TASK, "dev"), load_tokenizer(ckpt), 32)
    logp, states = run_all_layers(model, enc, 16, states=True)
    np.testing.assert_allclose(dev.log_probs, logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dev.states, states, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dev.labels, enc.labels)
    # dev accuracy of the cache's last layer is the one stage-1 training reported
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert T.compute_metric(TINY_TASK, dev.preds[:, -1], dev.labels) == metrics["dev"]["layer_metric"][-1]

    train = get_cache(TINY_TASK, "train", checkpoint=ckpt, verbose=False)
    assert train.states.shape == (N_TRAIN, 2, 32) and train.log_probs.shape == (N_TRAIN, 2, 2)
    assert train.fingerprint != dev.fingerprint
    assert len(cache_folders(tmp_runs)) == 2
    assert not (tmp_runs / "stage1").exists(), "an explicit checkpoint trains nothing"


def test_second_call_loads_from_disk(tmp_runs, ckpt, load_counter):
    first = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    assert len(load_counter) == 1
    (folder,) = cache_folders(tmp_runs)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    second = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    assert len(load_counter) == 1, "the second call rebuilt the cache"
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.log_probs, first.log_probs)
    get_cache(TINY_TASK, "dev", checkpoint=ckpt, rebuild=True, verbose=False)
    assert len(load_counter) == 2, "rebuild=True rebuilds"


def test_fingerprint_depends_on_everything_it_names(ckpt):
    base = dict(checkpoint=ckpt, task=TINY_TASK, split="dev", data_file="f", max_length=32, rows=None)
    fp = fingerprint(**base)
    assert fp == fingerprint(**base)
    for k, v in (("task", "Other"), ("split", "train"), ("data_file", "g"), ("max_length", 64), ("rows", "abc")):
        assert fingerprint(**{**base, k: v}) != fp, k


def test_new_weights_give_a_new_cache(tmp_runs, tmp_path, ckpt, load_counter):
    ck = tmp_path / "ck"
    shutil.copytree(ckpt, ck)
    old = get_cache(TINY_TASK, "dev", checkpoint=ck, verbose=False)
    old_logp, old_fp = np.array(old.log_probs), old.fingerprint

    model = MultiExitEncoder.load(ck)
    with torch.no_grad():
        model.heads[-1][1].bias += torch.tensor([1.0, -1.0])
    model.save(ck)  # re-save in place: same folder, new weights
    new = get_cache(TINY_TASK, "dev", checkpoint=ck, verbose=False)
    assert len(load_counter) == 3  # build, perturb, rebuild
    assert new.fingerprint != old_fp
    assert len(cache_folders(tmp_runs)) == 2, "a new cache next to the old one"
    assert not np.allclose(new.log_probs[:, -1], old_logp[:, -1])
    np.testing.assert_allclose(new.log_probs[:, 0], old_logp[:, 0], rtol=1e-5, atol=1e-6)  # layer 1 untouched


def test_edited_data_file_gives_a_new_cache(tmp_runs, tmp_path, ckpt, tiny_task_files, load_counter):
    files = {s: tmp_path / f.name for s, f in tiny_task_files.items()}
    for s, f in tiny_task_files.items():
        shutil.copy(f, files[s])
    register_tiny_task(files)
    a = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    with open(files["dev"], "a") as fh:
        fh.write("a good plot\tpos\n")
    b = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    assert b.fingerprint != a.fingerprint and b.num_instances == N_DEV + 1 and len(load_counter) == 2


def _replace(path, write) -> None:
    """Write a corrupt file under a new inode (earlier memory maps keep the old contents)."""
    tmp = path.with_name(path.name + ".corrupt")
    write(tmp)
    os.replace(tmp, path)


def _meta_edit(edit):
    def run(folder):
        meta = json.loads((folder / "meta.json").read_text())
        edit(meta)
        _replace(folder / "meta.json", lambda p: p.write_text(json.dumps(meta)))
    return run


def _save_array(arr_fn):
    def write(p):
        with open(p, "wb") as f:
            np.save(f, arr_fn())
    return write


CORRUPTIONS = {
    "log_probs_overwritten": lambda d: _replace(
        d / "log_probs.npy", _save_array(lambda: np.zeros((N_DEV, 2, 2), np.float32))),
    "log_probs_truncated": lambda d: _replace(
        d / "log_probs.npy", lambda p: p.write_bytes((d / "log_probs.npy").read_bytes()[:200])),
    # one label flipped (the checksums are sums: a permutation of the rows would go unnoticed)
    "label_flipped": lambda d: _replace(
        d / "labels.npy", _save_array(lambda: np.load(d / "labels.npy") ^ np.eye(1, N_DEV, 3, np.int64)[0])),
    "labels_missing": lambda d: (d / "labels.npy").unlink(),
    "log_probs_wrong_dtype": lambda d: _replace(
        d / "log_probs.npy", _save_array(lambda: np.load(d / "log_probs.npy").astype(np.float64))),
    "meta_shape_edited": _meta_edit(lambda m: m["arrays"]["states"].update(shape=[N_DEV, 3, 32])),
    "meta_fingerprint_edited": _meta_edit(lambda m: m.update(fingerprint="0" * 64)),
    "meta_format_edited": _meta_edit(lambda m: m.update(format=0)),
    "meta_missing": lambda d: (d / "meta.json").unlink(),
    "meta_garbage": lambda d: _replace(d / "meta.json", lambda p: p.write_text("{not json")),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_cache_is_detected_and_rebuilt(kind, tmp_runs, ckpt, load_counter, capsys):
    good = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    fp = good.fingerprint
    want = {k: np.array(getattr(good, k)) for k in ("states", "log_probs", "labels")}
    del good
    (folder,) = cache_folders(tmp_runs)

    CORRUPTIONS[kind](folder)
    with pytest.raises(CacheError):
        load_cache(folder, fp)
    capsys.readouterr()
    again = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    assert len(load_counter) == 2, "the corrupt cache was used instead of rebuilt"
    if kind != "meta_missing":  # without meta.json the folder is simply not a cache yet
        assert "unusable" in capsys.readouterr().out
    for k, v in want.items():
        np.testing.assert_array_equal(getattr(again, k), v)
    assert load_cache(folder, fp).fingerprint == fp  # the folder is whole again


def test_states_are_verified_by_default(tmp_runs, ckpt):
    good = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    fp = good.fingerprint
    del good
    (folder,) = cache_folders(tmp_runs)
    _replace(folder / "states.npy", _save_array(lambda: np.ones((N_DEV, 2, 32), np.float32)))
    load_cache(folder, fp, verify_states=False)  # opting out: only shape, dtype and finiteness of the states
    with pytest.raises(CacheError, match="states"):
        load_cache(folder, fp)


def test_save_load_round_trip_and_wrong_fingerprint(tmp_path):
    rng = np.random.default_rng(0)
    c = LayerCache(rng.normal(size=(5, 3, 4)).astype(np.float32),
                   np.log(rng.dirichlet([1, 1], size=(5, 3))).astype(np.float32),
                   np.array([0, 1, 1, 0, -1]), task="T", split="test", label_names=("a", "b"),
                   fingerprint="abc", meta={"k": 1})
    save_cache(c, tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.tmp*"))
    d = load_cache(tmp_path / "c", "abc", verify_states=True)
    for k in ("states", "log_probs", "labels"):
        np.testing.assert_array_equal(getattr(d, k), getattr(c, k))
    assert (d.task, d.split, d.label_names, d.meta, d.has_labels) == ("T", "test", ("a", "b"), {"k": 1}, False)
    with pytest.raises(CacheError, match="fingerprint"):
        load_cache(tmp_path / "c", "abd")


def test_layer_cache_rejects_bad_shapes():
    with pytest.raises(ValueError, match="states"):
        LayerCache(np.zeros((2, 3)), np.zeros((2, 3, 2)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="disagree"):
        LayerCache(np.zeros((2, 3, 4)), np.zeros((2, 2, 2)), np.zeros(2, np.int64))


def test_user_task_cache_needs_no_data_dir(tmp_runs, ckpt, monkeypatch, tmp_path):
    """A user task's files are absolute paths: no data directory is needed to fingerprint them."""
    monkeypatch.setenv("CEE_DATA_DIR", str(tmp_path / "no-such-dir"))
    assert get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False).num_instances == N_DEV


def test_env_on_a_tiny_checkpoint(tmp_runs, ckpt):
    env = cee_env.EarlyExitEnv(task=TINY_TASK, split="dev", checkpoint=str(ckpt))
    cache = env.cache
    assert env.num_instances == N_DEV and env.num_layers == 2 and env.observation_space.shape == (32,)
    assert env.sequential  # dev: one pass over the instances in order
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space and info["index"] == 0 and info["layer"] == 1
    np.testing.assert_array_equal(obs, cache.states[0, 0])
    obs, r, term, trunc, info = env.step(cee_env.env.CONTINUE)
    assert (r, term, trunc, info["layer"]) == (0.0, False, False, 2)
    np.testing.assert_array_equal(obs, cache.states[0, 1])
    obs, r, term, trunc, info = env.step(cee_env.env.CONTINUE)  # Continue at the last layer exits there
    assert term and not trunc and info["prediction"] == cache.preds[0, 1] and info["label"] == cache.labels[0]
    assert r == pytest.approx(float(env.tables.reward[0, 1]))
    # a whole evaluation pass exiting at layer 1
    correct = []
    for i in range(N_DEV):
        _, info = env.reset()
        _, _, term, _, info = env.step(cee_env.env.EXIT)
        assert term and info["index"] == (i + 1) % N_DEV and info["layer"] == 1
        correct.append(info["correct"])
    assert np.mean(correct) == pytest.approx((cache.preds[:, 0] == cache.labels).mean())
