"""Fault injection (issue 16): corrupted files, NaN, changed flags, interrupted and concurrent runs, hostile
run folders, odd input files. Each fault must end in a clear error (one line on the command line) or a correct
rebuild, never in a result built on bad data. Tiny fixtures only (conftest.py)."""
from __future__ import annotations

import base64
import json
import pickle
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TASK, TINY_TRAIN

import backbones.train as tr
from agents.inference.early_exit_model import EarlyExitClassifier
from agents.policies import LayerMLPPolicy, LearnedExit
from agents.runtime import policy_record
from backbones.cli import UserError
from backbones.files import IntegrityError, claim, sha256_file
from backbones.multiexit import CONFIG_NAME, WEIGHTS_NAME, MultiExitEncoder
from cee_env import make_synthetic_cache
from cee_env.cache import CacheError, LayerCache, get_cache, load_cache, save_cache


# --------------------------------------------------------------------------- helpers
def copy_ckpt(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def cfg_for(out: Path, tiny_encoder_dir, **kw) -> tr.TrainConfig:
    return tr.TrainConfig(task=TINY_TASK, model=str(tiny_encoder_dir), out=str(out), **{**TINY_TRAIN, **kw})


def edit_tensors(file: Path, edit, rehash_in: Path | None = None) -> None:
    """Rewrite a safetensors file after ``edit(tensors)``; ``rehash_in``: also record the new sha256 in that
    JSON file (as if whoever broke the weights also updated the record: the NaN check must still fire)."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(file))
    edit(t)
    save_file(t, str(file))
    if rehash_in is not None:
        meta = json.loads(rehash_in.read_text())
        meta["sha256"][file.name] = sha256_file(file)
        rehash_in.write_text(json.dumps(meta))


def four_nans(t: dict) -> None:
    k = next(k for k, v in t.items() if v.is_floating_point() and v.numel() >= 4)
    t[k].view(-1)[:4] = float("nan")


def flip_bytes(file: Path, n: int = 4) -> None:
    data = bytearray(file.read_bytes())
    for i in range(1, n + 1):
        data[-8 * i] ^= 0x5A
    file.write_bytes(bytes(data))


def one_line_exit(main, argv, capsys) -> str:
    """Run a command's main; it must end with exit code 2 and a single ``error: ...`` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def save_policy_run(cache: LayerCache, run: Path, checkpoint: Path | None = None, seed: int = 0) -> LearnedExit:
    torch.manual_seed(seed)
    net = LayerMLPPolicy(cache.hidden_size, cache.num_layers, hidden=8)
    net.set_normaliser(np.asarray(cache.states))
    net.save(run, extra={**policy_record(cache), "checkpoint": str(checkpoint) if checkpoint else None})
    return LearnedExit(net)


# --------------------------------------------------------------------------- 1. corruption and NaN
def test_nan_in_checkpoint_weights_is_refused_and_nothing_is_cached(ckpt, tmp_runs, capsys):
    bad = copy_ckpt(ckpt, tmp_runs / "stage1" / "bad")
    edit_tensors(bad / WEIGHTS_NAME, four_nans)
    with pytest.raises(IntegrityError, match=f"{WEIGHTS_NAME}.*sha256.*train it again"):
        MultiExitEncoder.load(bad)
    with pytest.raises(IntegrityError, match=WEIGHTS_NAME):
        get_cache(TINY_TASK, "dev", checkpoint=bad, verbose=False)
    assert not list((tmp_runs / "cache").rglob("meta.json")), "a cache was built from broken weights"
    # the sha256 recorded again to match: the NaN check still refuses the weights
    edit_tensors(bad / WEIGHTS_NAME, lambda t: None, rehash_in=bad / CONFIG_NAME)
    with pytest.raises(IntegrityError, match="NaN"):
        MultiExitEncoder.load(bad)
    from agents.predict import main

    line = one_line_exit(main, ["--checkpoint", str(bad), "--rule", "static-1", "--text", "a good film"], capsys)
    assert WEIGHTS_NAME in line


def test_flipped_bytes_in_checkpoint_weights_are_refused(ckpt, tmp_path):
    bad = copy_ckpt(ckpt, tmp_path / "bad")
    flip_bytes(bad / WEIGHTS_NAME)
    with pytest.raises(IntegrityError, match="corrupt or modified"):
        MultiExitEncoder.load(bad)


@pytest.mark.parametrize("fault", ["nan", "flipped_bytes", "nan_with_checksum_updated"])
def test_damaged_cache_states_are_detected_and_rebuilt(fault, ckpt, tmp_runs, load_counter, capsys):
    good = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    want = np.array(good.states)
    del good
    (folder,) = [p for p in (tmp_runs / "cache" / TINY_TASK).iterdir() if p.is_dir()]
    states = np.load(folder / "states.npy")
    if fault == "flipped_bytes":
        flip_bytes(folder / "states.npy")
    else:
        states.reshape(-1)[[3, 50, 700, 1500]] = np.nan
        np.save(folder / "states.npy", states)
        if fault == "nan_with_checksum_updated":
            from cee_env.cache import _checksum

            meta = json.loads((folder / "meta.json").read_text())
            meta["arrays"]["states"]["checksum"] = _checksum(states)
            (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="states"):
        load_cache(folder)
    again = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    assert len(load_counter) == 2 and "unusable" in capsys.readouterr().out
    np.testing.assert_array_equal(again.states, want)


def test_non_finite_layer_outputs_are_never_cached(tmp_path):
    states = np.zeros((3, 2, 4), np.float32)
    states[1, 1, 2] = np.inf
    cache = LayerCache(states, np.log(np.full((3, 2, 2), 0.5, np.float32)), np.zeros(3, np.int64), task="T",
                       split="dev", meta={"checkpoint": "/somewhere/ckpt"})
    with pytest.raises(IntegrityError, match="states.*/somewhere/ckpt"):
        save_cache(cache, tmp_path / "c")
    assert not (tmp_path / "c" / "meta.json").exists()


def test_a_diverged_policy_never_replaces_a_good_run(tmp_path, monkeypatch):
    """The issue's NaN-states run: an all-NaN policy is refused before saving, the good run of the same name
    (policy and results.json) is left as it was."""
    from agents.reinforce import Args, train

    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path))
    caches = {s: make_synthetic_cache(n=64, num_layers=3, hidden=8, split=s, seed=1) for s in ("train", "dev")}
    args = Args(env="cee/Synthetic-v0", alpha=0.3, reward="vanilla", epochs=1, batch_size=16, k=2, quiet=True,
                run_name="same")
    run = train(args, caches)["run_dir"]
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    assert {"policy.safetensors", "policy.json", "results.json"} <= set(before)
    states = np.array(caches["train"].states)
    states.reshape(-1)[[1, 20, 300, 400]] = np.nan
    caches["train"] = LayerCache(states, caches["train"].log_probs, caches["train"].labels, task="Synthetic",
                                 split="train")
    with pytest.raises(IntegrityError, match="refusing to save the exit policy"):
        train(args, caches)
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before


@pytest.mark.parametrize("fault", ["flipped_bytes", "nan_with_checksum_updated"])
def test_damaged_policy_file_is_refused_by_predict(fault, ckpt, tmp_runs, capsys):
    dev = get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False)
    run = tmp_runs / "reinforce" / "p"
    save_policy_run(dev, run, ckpt)
    if fault == "flipped_bytes":
        flip_bytes(run / "policy.safetensors")
    else:
        edit_tensors(run / "policy.safetensors", four_nans, rehash_in=run / "policy.json")
    with pytest.raises(IntegrityError, match="policy.safetensors"):
        LayerMLPPolicy.load(run)
    from agents.predict import main

    line = one_line_exit(main, ["--run", str(run), "--text", "a good film"], capsys)
    assert "policy.safetensors" in line and "train it again" in line


# --------------------------------------------------------------------------- 2. a data file edited in place
def test_test_file_edited_in_place_gets_a_new_cache(ckpt, tmp_runs, tmp_path):
    from conftest import make_rows

    f = tmp_path / "test.tsv"

    def write(n):
        f.write_text("text\tlabel\n" + "".join(f"{s}\t{'pos' if y else 'neg'}\n" for s, y in make_rows(n, 9)))

    write(8)
    assert get_cache(TINY_TASK, "test", checkpoint=ckpt, test_file=str(f), verbose=False).num_instances == 8
    write(60)
    assert get_cache(TINY_TASK, "test", checkpoint=ckpt, test_file=str(f), verbose=False).num_instances == 60


# --------------------------------------------------------------------------- 3. resume safety
class Crash(RuntimeError):
    pass


def interrupted_run(out: Path, tiny_encoder_dir, monkeypatch, at: int = 9) -> tr.TrainConfig:
    """A 2-epoch run interrupted at step ``at`` (saves every 3 steps): state/ holds its progress."""
    cfg = cfg_for(out, tiny_encoder_dir, epochs=2, save_every=3)
    real, calls = tr.weighted_exit_loss, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == at:
            raise Crash("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(tr, "weighted_exit_loss", crashing)
    with pytest.raises(Crash):
        tr.train(cfg)
    monkeypatch.setattr(tr, "weighted_exit_loss", real)
    assert (out / "state" / "progress.json").is_file() and not tr.is_complete(out)
    return cfg


def test_resume_with_other_flags_or_data_is_refused(tiny_task, tiny_task_files, tiny_encoder_dir, tmp_runs,
                                                    monkeypatch, capsys):
    out = tmp_runs / "ck"
    cfg = interrupted_run(out, tiny_encoder_dir, monkeypatch)
    state = {p.name: p.read_bytes() for p in (out / "state").iterdir()}
    with pytest.raises(UserError, match=r"interrupted run with other settings: epochs 2 -> 3; lr 0.003 -> 0.001.*"
                                        r"delete .* or pass --out"):
        tr.train(cfg_for(out, tiny_encoder_dir, epochs=3, lr=1e-3))
    other = tmp_runs / "train.tsv"  # another --train-file: same rows but one, in another file
    other.write_text("".join(tiny_task_files["train"].read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(UserError, match="training rows"):
        tr.train(cfg_for(out, tiny_encoder_dir, epochs=2, save_every=3, train_file=str(other)))
    line = one_line_exit(tr.main, ["--task", TINY_TASK, "--model", str(tiny_encoder_dir), "--out", str(out),
                                   "--epochs", "2", "--lr", "0.01"], capsys)
    assert "lr 0.003 -> 0.01" in line
    assert {p.name: p.read_bytes() for p in (out / "state").iterdir()} == state, "a refused run touched the state"
    # the same flags resume (only the remaining steps run)
    assert tr.train(cfg) == out and tr.is_complete(out) and "resuming ck" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["progress_garbage", "optimizer_truncated", "correct_missing"])
def test_damaged_resume_state_says_how_to_recover(damage, tiny_task, tiny_encoder_dir, tmp_runs, monkeypatch,
                                                  capsys):
    out = tmp_runs / "ck"
    cfg = interrupted_run(out, tiny_encoder_dir, monkeypatch)
    state = out / "state"
    if damage == "progress_garbage":
        (state / "progress.json").write_text("{not json")
    elif damage == "optimizer_truncated":
        f = next(p for p in state.iterdir() if p.name.startswith("optimizer"))
        f.write_bytes(f.read_bytes()[:100])
    else:
        (state / "train_correct.npy").unlink()
    with pytest.raises(UserError, match=f"{state}.* is damaged .*delete {state} to train ck from the start"):
        tr.train(cfg)
    shutil.rmtree(state)  # what the message says to do
    assert tr.train(cfg) == out and tr.is_complete(out)


def test_an_interrupted_state_swap_resumes(tiny_task, tiny_encoder_dir, tmp_runs, monkeypatch, capsys):
    """Killed after state.new/ was written but before it replaced state/: the next run resumes from it."""
    out = tmp_runs / "ck"
    cfg = interrupted_run(out, tiny_encoder_dir, monkeypatch)
    (out / "state").rename(out / "state.new")
    capsys.readouterr()
    assert tr.train(cfg) == out and "resuming ck at epoch 2" in capsys.readouterr().out
    assert tr.is_complete(out) and not (out / "state").exists() and not (out / "state.new").exists()


def test_deleted_metrics_are_rebuilt_without_retraining(ckpt, tiny_encoder_dir, tmp_path, monkeypatch, capsys):
    out = copy_ckpt(ckpt, tmp_path / "ck")
    original = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    weights = (out / WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(tr, "weighted_exit_loss", lambda *a, **k: pytest.fail("retrained"))
    assert tr.ensure_checkpoint(TINY_TASK, model=str(tiny_encoder_dir), out=str(out), **TINY_TRAIN) == out
    printed = capsys.readouterr().out
    assert "metrics.json is missing but the weights are there" in printed and "training it now" not in printed
    rebuilt = json.loads((out / "metrics.json").read_text())
    assert rebuilt["rebuilt"] and rebuilt["dev"]["layer_metric"] == pytest.approx(original["dev"]["layer_metric"])
    assert (out / WEIGHTS_NAME).read_bytes() == weights and tr.is_complete(out)


def test_a_checkpoint_trained_otherwise_is_not_reused(ckpt, tiny_task, tiny_encoder_dir, tmp_path, capsys):
    out = copy_ckpt(ckpt, tmp_path / "ck")
    with pytest.raises(UserError, match=r"checkpoint trained with other settings: epochs 6 -> 2"):
        tr.ensure_checkpoint(TINY_TASK, model=str(tiny_encoder_dir), out=str(out), **{**TINY_TRAIN, "epochs": 2})
    with pytest.raises(UserError, match=r"epochs 6 -> 2"):
        tr.train(cfg_for(out, tiny_encoder_dir, epochs=2))
    assert tr.ensure_checkpoint(TINY_TASK, model=str(tiny_encoder_dir), out=str(out), **TINY_TRAIN) == out


def test_a_checkpoint_is_not_reused_after_its_train_file_changed(ckpt, tiny_task, tiny_task_files, tiny_encoder_dir,
                                                                 tmp_path, monkeypatch):
    out = copy_ckpt(ckpt, tmp_path / "ck")
    same, changed = tmp_path / "same.tsv", tmp_path / "changed.tsv"
    text = tiny_task_files["train"].read_text()
    same.write_text(text)
    header, *rows = text.splitlines()
    changed.write_text("\n".join([header, rows[1], rows[0], *rows[2:]]) + "\n")  # two rows swapped
    monkeypatch.setattr(tr, "weighted_exit_loss", lambda *a, **k: pytest.fail("retrained"))
    kw = dict(model=str(tiny_encoder_dir), out=str(out), **TINY_TRAIN)
    assert tr.ensure_checkpoint(TINY_TASK, train_file=str(same), **kw) == out  # same rows from another path: reused
    with pytest.raises(UserError, match=f"other settings: training rows \\(the content of {changed}"):
        tr.ensure_checkpoint(TINY_TASK, train_file=str(changed), **kw)
    with pytest.raises(UserError, match=f"trained on other rows than {changed} gives now"):
        get_cache(TINY_TASK, "train", checkpoint=out, data_file=str(changed), verbose=False)


# --------------------------------------------------------------------------- concurrency
def test_a_second_trainer_waits_for_the_first(ckpt, tiny_task, tiny_encoder_dir, tmp_path, capsys):
    out = copy_ckpt(ckpt, tmp_path / "ck")
    held = threading.Event()

    def first_process():
        with claim(out):
            held.set()
            time.sleep(1.5)

    t = threading.Thread(target=first_process)
    t.start()
    held.wait()
    t0 = time.time()
    assert tr.train(cfg_for(out, tiny_encoder_dir)) == out
    t.join()
    captured = capsys.readouterr()
    assert time.time() - t0 > 1.0 and "waiting for another process" in captured.err
    assert "already trained" in captured.out


def test_two_writers_of_one_cache_build_it_once(ckpt, tmp_runs, load_counter):
    results, errors = [], []

    def writer():
        try:
            results.append(np.array(get_cache(TINY_TASK, "dev", checkpoint=ckpt, verbose=False).log_probs))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and len(load_counter) == 1
    np.testing.assert_array_equal(results[0], results[1])
    folder = tmp_runs / "cache" / TINY_TASK
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name], "temporary files left behind"


# --------------------------------------------------------------------------- 4. no code execution on load
@pytest.fixture(scope="module")
def syn():
    return make_synthetic_cache(n=48, num_layers=3, hidden=8, split="dev", seed=2)


def sb3_policy(algo: str, cache: LayerCache):
    from stable_baselines3 import A2C, DQN, PPO

    from agents.sb3 import SB3Exit, cache_obs_stats
    from cee_env import EarlyExitEnv

    env = EarlyExitEnv(cache=cache, obs="state_layer", obs_bound=50.0)
    cls, kw = {"ppo": (PPO, dict(n_steps=16, batch_size=16)), "a2c": (A2C, {}),
               "dqn": (DQN, dict(buffer_size=100, learning_starts=0))}[algo]
    model = cls("MlpPolicy", env, seed=0, device="cpu", policy_kwargs={"net_arch": [16, 8]}, **kw)
    mean, var = cache_obs_stats(cache, 50.0)
    return SB3Exit(model, cache.num_layers, 50.0, mean, var)


@pytest.mark.parametrize("algo", ["ppo", "a2c", "dqn"])
def test_sb3_policy_loads_without_unpickling(algo, syn, tmp_path, monkeypatch):
    from agents import sb3
    from agents.evaluate import evaluate

    policy = sb3_policy(algo, syn)
    policy.save(tmp_path / "run", extra={"task": "Synthetic"})
    (tmp_path / "run" / "model.zip").unlink()
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(sb3.ALGOS[algo], "load", classmethod(lambda *a, **k: pytest.fail("read model.zip")))
    loaded = sb3.SB3Exit.load(tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "sb3_policy.json").read_text())
    assert (cfg["algo"], cfg["obs"], cfg["obs_size"], cfg["policy_kwargs"]["net_arch"]) == (algo, "state_layer", 8 + 3,
                                                                                         [16, 8])
    a, b = evaluate(policy, syn), evaluate(loaded, syn)
    np.testing.assert_array_equal(a.exit_layers, b.exit_layers)
    flip_bytes(tmp_path / "run" / "sb3_policy.safetensors")
    with pytest.raises(IntegrityError, match="sb3_policy.safetensors"):
        sb3.SB3Exit.load(tmp_path / "run")


def hostile_run(run: Path, marker: Path) -> Path:
    """An old-style SB3 run folder whose model.zip runs code when unpickled (it creates ``marker``)."""
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    run.mkdir(parents=True)
    blob = base64.b64encode(pickle.dumps(Payload())).decode()
    with zipfile.ZipFile(run / "model.zip", "w") as z:
        z.writestr("data", json.dumps({"policy_class": {":type:": "x", ":serialized:": blob}}))
    (run / "sb3_policy.json").write_text(json.dumps({"algo": "ppo", "num_layers": 2, "obs_bound": 50.0,
                                                     "obs": "state_layer", "task": TINY_TASK}))
    return run


def test_a_pickled_model_zip_is_refused_unless_trusted(ckpt, tmp_path, capsys):
    from agents.predict import main
    from agents.sb3 import SB3Exit

    marker = tmp_path / "pwned"
    run = hostile_run(tmp_path / "run", marker)
    with pytest.raises(ValueError, match="--trust-pickle"):
        EarlyExitClassifier.from_run(run, checkpoint=ckpt)
    line = one_line_exit(main, ["--run", str(run), "--checkpoint", str(ckpt), "--text", "a good film"], capsys)
    assert "--trust-pickle" in line and not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - what the payload does after running is beside the point
        SB3Exit.load(run, trust_pickle=True)
    assert marker.exists(), "the payload is real: trusting the folder ran it"


def test_an_honest_old_sb3_run_loads_when_trusted(syn, tmp_path):
    from agents.evaluate import evaluate
    from agents.sb3 import SB3Exit

    policy = sb3_policy("ppo", syn)
    run = tmp_path / "old"
    run.mkdir()
    policy.model.save(run / "model.zip")
    np.savez(run / "obs_norm.npz", mean=policy.obs_mean, var=policy.obs_var, clip_obs=10.0, epsilon=1e-8)
    (run / "sb3_policy.json").write_text(json.dumps({"algo": "ppo", "num_layers": 3, "obs_bound": 50.0}))
    loaded = SB3Exit.load(run, trust_pickle=True)
    np.testing.assert_array_equal(evaluate(loaded, syn).exit_layers, evaluate(policy, syn).exit_layers)


# --------------------------------------------------------------------------- a copied or moved runs/
def test_a_moved_runs_dir_keeps_working(ckpt, tiny_task, tmp_runs, tmp_path, monkeypatch, load_counter):
    from agents.reinforce import Args, train

    local = copy_ckpt(ckpt, tmp_runs / "stage1" / "tiny")
    caches = {s: get_cache(TINY_TASK, s, checkpoint=local, verbose=False) for s in ("train", "dev")}
    out = train(Args(env=f"cee/{TINY_TASK}-v0", epochs=1, batch_size=16, k=2, quiet=True, run_name="r"), caches)
    run = out["run_dir"]
    assert json.loads((run / "policy.json").read_text())["checkpoint"] == "stage1/tiny"
    cache_meta = [json.loads(f.read_text())["meta"]["checkpoint"] for f in (tmp_runs / "cache").rglob("meta.json")]
    assert cache_meta == ["stage1/tiny", "stage1/tiny"]
    texts = ["a good film", "the plot was bad", "good good"]
    want = EarlyExitClassifier.from_run(run).predict(texts)
    n_builds = len(load_counter)

    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(str(tmp_runs), moved)
    monkeypatch.setenv("CEE_RUNS_DIR", str(moved))
    clf = EarlyExitClassifier.from_run(moved / "reinforce" / "r")
    assert clf.checkpoint == moved / "stage1" / "tiny"
    got = clf.predict(texts)
    np.testing.assert_array_equal(got.label_ids, want.label_ids)
    np.testing.assert_array_equal(got.exit_layers, want.exit_layers)
    dev = get_cache(TINY_TASK, "dev", checkpoint=moved / "stage1" / "tiny", verbose=False)
    assert len(load_counter) == n_builds + 1, "the moved cache was rebuilt"  # +1: from_run loaded the checkpoint
    assert dev.meta["checkpoint"] == str(moved / "stage1" / "tiny")


def test_cotrain_resume_with_other_settings_is_refused(ckpt, tiny_task, tmp_runs, capsys):
    from agents import cotrain

    root = tmp_runs / "cotrain" / "t"
    root.mkdir(parents=True)
    (root / "state.json").write_text(json.dumps({"rounds": [{"round": 0, "checkpoint": str(ckpt),
                                                             "policy": "cotrain/t/round-0/policy"}]}))
    (root / "args.json").write_text(json.dumps({"alpha": 0.1, "policy_epochs": 30, "name": "t"}))
    line = one_line_exit(cotrain.main, ["--env", f"cee/{TINY_TASK}-v0", "--checkpoint", str(ckpt), "--name", "t",
                                        "--alpha", "0.05"], capsys)
    assert "alpha 0.1 -> 0.05" in line and "--name" in line


@pytest.mark.parametrize("flag,value", [("--alpha", "nan"), ("--rounds", "-1"), ("--policy-epochs", "0"),
                                        ("--backbone-lr", "inf")])
def test_cotrain_flags_out_of_range_are_one_line_errors(flag, value, capsys):
    from agents import cotrain

    assert flag in one_line_exit(cotrain.main, [flag, value], capsys)


# --------------------------------------------------------------------------- smaller faults
def test_non_utf8_input_names_file_and_line(tmp_path, ckpt, tiny_task, capsys):
    from agents.predict import main
    from backbones import tasks as T

    f = tmp_path / "in.txt"
    f.write_bytes(b"a good film\nthe plot\n\xff\xfe bad\n")
    line = one_line_exit(main, ["--checkpoint", str(ckpt), "--rule", "static-1", "--input", str(f)], capsys)
    assert f"{f}, line 3" in line and "UTF-8" in line
    g = tmp_path / "dev.tsv"
    g.write_bytes(b"text\tlabel\ngood\tpos\nbad \xe9\tneg\n")
    with pytest.raises(T.TaskError, match=rf"{g}, line 3, column 5: not UTF-8"):
        T.load_split(TINY_TASK, "dev", path=g)


def test_csv_labels_1_and_1_0_are_one_class(tmp_path):
    from backbones import tasks as T

    f = tmp_path / "train.csv"
    f.write_text("text,y\na,1\nb,1.0\nc,0\nd,0.0\ne,1\n")
    spec = T.task_from_file("Numbers", f, text_a="text", label="y")
    assert spec.label_names == ("0", "1")
    assert T.load_split(spec, "train")["label"] == [1, 1, 0, 0, 1]


def test_extra_tab_column_in_predict_input_is_an_error(tmp_path, ckpt, tiny_task, capsys):
    from agents.predict import main, read_texts

    f = tmp_path / "in.txt"
    f.write_text("a good film\tit was good\n\nthe plot\twas bad\tEXTRA\n")
    line = one_line_exit(main, ["--checkpoint", str(ckpt), "--rule", "static-1", "--input", str(f)], capsys)
    assert f"{f}, line 3: 3 tab-separated fields" in line
    f.write_text("a good film\tit was good\nthe plot\n")
    assert read_texts(f) == (["a good film", "the plot"], ["it was good", ""])


def test_stage1_flags_out_of_range_are_one_line_errors(capsys):
    assert "--epochs must be >= 1" in one_line_exit(tr.main, ["--epochs", "0"], capsys)
    assert "--lr must be a finite number" in one_line_exit(tr.main, ["--lr", "nan"], capsys)

