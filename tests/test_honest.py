"""Issue 21, "honest by construction": a policy is never calibrated on rows it learned on, a calibration is
used only with the policy it was made for, a policy only with its task, labels and backbone, thresholds and env
arguments are checked wherever they are read, a task too small for calib rows is refused, and the commands'
files and folders are checked before any work (a failed write is one line naming the path)."""
from __future__ import annotations

import errno
import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
from conftest import TINY_TASK, TINY_TRAIN
from test_faults import edit_tensors, one_line_exit

import agents.calibrate as C
from agents.fqi import Args as FArgs
from agents.fqi import train as ftrain
from agents.inference.early_exit_model import load_policy
from agents.reinforce import Args as RArgs
from agents.reinforce import train as rtrain
from backbones.files import write_json
from cee_env import make_synthetic_cache
from cee_env.cache import calib_half, get_cache, take_rows

SYN = "cee/Synthetic-v0"


@pytest.fixture()
def calib(monkeypatch):
    """A synthetic calib split; agents.calibrate reads it (and its halves, and a "train" split holding the same
    rows, as the crossfit protocol's deployed backbone does) instead of a real task's caches."""
    cal = make_synthetic_cache(n=600, split="calib", seed=0)
    splits = {"calib": cal, "calib-a": calib_half(cal, "calib-a"), "calib-b": calib_half(cal, "calib-b"),
              "train": take_rows(cal, np.arange(cal.num_instances), "train")}
    monkeypatch.setattr(C, "calibration_cache", lambda task, split, *a: splits[split])
    return splits


def syn_caches(calib, split):
    return {"train": calib[split], "dev": make_synthetic_cache(n=100, split="dev")}


# --------------------------------------------------------------------------- 1. what a policy learned on
@pytest.mark.parametrize("learner", ["fqi", "ppo"])
def test_fqi_and_sb3_policies_are_not_calibrated_on_the_rows_they_learned_on(learner, calib, tmp_runs, capsys):
    if learner == "fqi":
        fit = lambda split: ftrain(FArgs(env=SYN, epochs=20, quiet=True, run_name=split), syn_caches(calib, split))  # noqa: E731
    else:
        from agents.sb3 import Args as SArgs
        from agents.sb3 import train as strain

        fit = lambda split: strain(SArgs(algo="ppo", env=SYN, total_timesteps=512, n_steps=64, batch_size=64,  # noqa: E731
                                         quiet=True, run_name=split), syn_caches(calib, split))
    run = fit("calib")["run_dir"]  # learned on all of calib (the learners' default train split)
    line = one_line_exit(C.main, ["--run", str(run), "--epsilon", "0.1", "--delta", "0.2"], capsys)
    assert "learned on all of calib" in line and "--train-split calib-a" in line
    line = one_line_exit(C.main, ["--run", str(run), "--cal-split", "calib-b", "--epsilon", "0.1", "--delta", "0.2"],
                         capsys)
    assert "would reuse those rows (300 of its 300)" in line and "--train-split calib-a" in line
    assert not (run / "calibration.json").exists()

    run = fit("calib-a")["run_dir"]  # learned on one half: calibrated on the other
    rec = C.main(["--run", str(run), "--epsilon", "0.1", "--delta", "0.2"])
    assert rec["cal_split"] == "calib-b" and (run / "calibration.json").is_file()


def test_rows_shared_under_other_split_names_are_refused(calib, tmp_runs, capsys):
    # Under the crossfit protocol the deployed backbone's "train" rows are the calib rows: names differ, rows do not.
    run = rtrain(RArgs(env=SYN, epochs=1, quiet=True, run_name="tr"), syn_caches(calib, "train"))["run_dir"]
    line = one_line_exit(C.main, ["--run", str(run), "--epsilon", "0.1", "--delta", "0.2"], capsys)
    assert "learned on train; calibrating on calib would reuse those rows (600 of its 600)" in line


def test_a_policy_without_a_record_of_its_rows_is_refused(calib, tmp_runs, capsys):
    run = rtrain(RArgs(env=SYN, epochs=1, quiet=True, run_name="old"), syn_caches(calib, "calib-a"))["run_dir"]
    meta = json.loads((run / "policy.json").read_text())
    del meta["learned_on"]  # as an older run wrote it
    (run / "policy.json").write_text(json.dumps(meta))
    line = one_line_exit(C.main, ["--run", str(run), "--epsilon", "0.1", "--delta", "0.2"], capsys)
    assert "records no hash of the rows it learned on" in line and "train it again" in line


# --------------------------------------------------------------------------- 2. a calibration for its policy only
def test_a_calibration_is_not_applied_to_a_policy_trained_again(calib, tmp_runs):
    args = dict(env=SYN, epochs=2, quiet=True, run_name="same")
    run = rtrain(RArgs(**args), syn_caches(calib, "calib-a"))["run_dir"]
    rec = C.main(["--run", str(run), "--epsilon", "0.1", "--delta", "0.2"])
    assert load_policy(run)[0].threshold == pytest.approx(rec["threshold"])
    rtrain(RArgs(**args, seed=1), syn_caches(calib, "calib-a"))  # another policy in the same folder
    with pytest.raises(ValueError, match="calibration.json was not made for the policy now in"):
        load_policy(run)
    assert load_policy(run, threshold=0.5)[0].threshold == 0.5  # an explicit threshold needs no calibration


def test_run_folders_of_different_settings_differ(calib, tmp_runs):
    from agents.runtime import run_name
    from agents.sb3 import Args as SArgs
    from agents.sb3 import sb3_run_name

    base = "Synthetic-v0-hardness-a0.05-s0"
    shown = ("env", "reward", "alpha", "seed")
    names = {run_name(RArgs(env=SYN, **kw), base, shown)
             for kw in ({}, {"obs": "confidence"}, {"train_split": "calib-a"}, {"epochs": 5}, {"k": 4}, {"lr": 1e-3},
                        {"quiet": True, "eval_every": 1, "torch_threads": 2})}  # the last changes no policy
    assert len(names) == 6 and base in names
    assert sb3_run_name(SArgs(env=SYN)) == "Synthetic-v0-ppo-hardness-a0.05-s0"
    assert sb3_run_name(SArgs(env=SYN, total_timesteps=1000)) != sb3_run_name(SArgs(env=SYN))
    out = rtrain(RArgs(env=SYN, epochs=1, quiet=True, train_split="calib-a"), syn_caches(calib, "calib-a"))
    assert out["run_dir"].name.startswith(base + "-") and out["run_dir"].name != base
    fqi = ftrain(FArgs(env=SYN, epochs=5, quiet=True, lr=0.02), syn_caches(calib, "calib-a"))["run_dir"]
    assert fqi.name.startswith("Synthetic-v0-consistency-a0.01-confidence-s0-")


# --------------------------------------------------------------------------- 9. faults a user can cause
@pytest.fixture()
def tiny_run(ckpt, tmp_runs):
    caches = {s: get_cache(TINY_TASK, s, checkpoint=ckpt, verbose=False) for s in ("train", "dev")}
    return rtrain(RArgs(env=f"cee/{TINY_TASK}-v0", epochs=1, batch_size=16, k=2, quiet=True, run_name="r"),
                  caches)["run_dir"]


def test_a_policy_refuses_another_task_label_set_or_checkpoint(tiny_run, ckpt, tiny_rte_files, tmp_path, capsys):
    from agents.inference.early_exit_model import check_policy_fits
    from agents.predict import main

    meta = json.loads((tiny_run / "policy.json").read_text())
    assert meta["task"] == TINY_TASK and meta["label_names"] == ["neg", "pos"] and meta["num_layers"] == 2
    line = one_line_exit(main, ["--run", str(tiny_run), "--task", "RTE", "--input", str(tiny_rte_files["dev"])], capsys)
    assert f"trained for task {TINY_TASK}, not RTE" in line
    with pytest.raises(ValueError, match="trained for the labels"):
        check_policy_fits(tiny_run, meta, label_names=["neg", "pos", "neutral"])
    other = shutil.copytree(ckpt, tmp_path / "other")  # the same architecture, other weights
    edit_tensors(other / "model.safetensors", lambda t: t[next(iter(t))].mul_(0.5), rehash_in=other / "multiexit.json")
    line = one_line_exit(main, ["--run", str(tiny_run), "--checkpoint", str(other), "--text", "a good film"], capsys)
    assert "is not the backbone" in line
    line = one_line_exit(main, ["--checkpoint", str(ckpt), "--rule", "static-1", "--task", "RTE", "--input",
                                str(tiny_rte_files["dev"])], capsys)
    assert "was trained with the labels ['neg', 'pos'], not RTE's" in line
    assert main(["--run", str(tiny_run), "--text", "a good film"]) == 0  # its own backbone and task


@pytest.mark.parametrize("bad", ["NaN", "5.0", "-1.0", '"0.5"', "null"])
def test_bad_thresholds_are_refused_naming_the_file(bad, calib, tmp_runs):
    run = rtrain(RArgs(env=SYN, epochs=1, quiet=True, run_name="t"), syn_caches(calib, "calib-a"))["run_dir"]
    C.main(["--run", str(run), "--epsilon", "0.1", "--delta", "0.2"])
    text = (run / "calibration.json").read_text()
    rec = json.loads(text)
    (run / "calibration.json").write_text(text.replace(f'"threshold": {json.dumps(rec["threshold"])}',
                                                       f'"threshold": {bad}'))
    with pytest.raises(ValueError, match=r"calibration.json: the exit threshold must be a number in \[0, 1\]"):
        load_policy(run)



def test_bad_threshold_flags_are_refused(calib, tmp_runs, capsys):
    from agents.predict import main

    run = rtrain(RArgs(env=SYN, epochs=1, quiet=True, run_name="t"), syn_caches(calib, "calib-a"))["run_dir"]
    for bad in ("nan", "5.0", "-1.0"):
        line = one_line_exit(main, ["--run", str(run), "--text", "x", "--threshold", bad], capsys)
        assert "--threshold: the exit threshold must be a number in [0, 1]" in line


def test_a_policy_that_never_exits_early_keeps_its_threshold(calib, tmp_runs, monkeypatch):
    # When only the first, most conservative Learn-then-Test value (+inf) passes, the record says 1.0 (never exit
    # early), not null (JSON's infinity), which load_policy read as "no calibration" and replaced by 0.5.
    real = C.learn_then_test

    def only_the_first_passes(*a, **k):
        cal = real(*a, **k)
        cal.threshold = float("inf")
        return cal

    monkeypatch.setattr(C, "learn_then_test", only_the_first_passes)
    run = rtrain(RArgs(env=SYN, epochs=1, quiet=True, run_name="inf"), syn_caches(calib, "calib-a"))["run_dir"]
    rec = C.main(["--run", str(run), "--epsilon", "0.1", "--delta", "0.2"])
    assert rec["threshold"] == 1.0 and load_policy(run)[0].threshold == 1.0
    rec = C.main(["--rule", "patience", "--task", "Synthetic", "--epsilon", "0.1", "--delta", "0.2"])
    assert rec["predict_rule"] == "full"


@pytest.mark.parametrize("labels, match", [([0] * 40, "single class"), ([0, 1, 1], "3 training rows are too few to hold out calib rows"),
                                           ([0, 1] * 10, r"at least 34 rows \(--holdout 0.3\)")])
def test_a_task_too_small_for_calib_rows_is_refused(labels, match):
    from backbones.protocol import partition

    with pytest.raises(ValueError, match=match):
        partition(np.array(labels), holdout=0.3)
    assert len(partition(np.array([0, 1] * 17), holdout=0.3).held_out) >= 10


def test_a_three_row_train_file_trains_no_backbone(tmp_path, tiny_encoder_dir, tmp_runs):
    import backbones.train as tr
    from backbones.tasks import task_from_file

    (tmp_path / "train.tsv").write_text("text\tlabel\na good film\tpos\na bad film\tneg\ngood\tpos\n")
    (tmp_path / "dev.tsv").write_text("text\tlabel\na good film\tpos\na bad film\tneg\n")
    task_from_file("Three", tmp_path / "train.tsv", text_a="text", label="label", dev_path=tmp_path / "dev.tsv",
                   label_names=["neg", "pos"])
    out = tmp_path / "ck"
    with pytest.raises(ValueError, match=r"task Three .*3 training rows are too few .* at least 34 rows"):
        tr.train(tr.TrainConfig(task="Three", model=str(tiny_encoder_dir), out=str(out), holdout=0.3, **TINY_TRAIN))
    assert not out.exists()


def test_env_arguments_are_checked_like_the_command_line(capsys):
    from agents.reinforce import main

    for kw in ({"alpha": -1.0}, {"alpha": float("nan")}, {"reward": "nope"}, {"obs": "pixels"}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be"):
            gym.make(SYN, **kw)
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be"):
            gym.make_vec(SYN, num_envs=2, vectorization_mode="vector_entry_point", **kw)
    line = one_line_exit(main, ["--env", SYN, "--alpha", "-1"], capsys)
    assert "--alpha must be a finite number >= 0" in line


def test_inputs_and_outputs_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    import agents.reinforce as R
    from agents import fqi, predict, sb3

    def no_work(*a, **k):
        raise AssertionError("work started before the inputs were checked")

    for mod in (R, fqi, sb3):
        monkeypatch.setattr(mod, "make_caches", no_work)
    monkeypatch.setattr(C, "calibration_cache", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for main in (R.main, fqi.main, sb3.main):
        assert "--test-file nowhere.tsv: no such file" in one_line_exit(main, ["--env", SYN, "--test-file",
                                                                             "nowhere.tsv"], capsys)
        assert "--checkpoint nowhere: no such folder" in one_line_exit(main, ["--env", SYN, "--checkpoint",
                                                                            "nowhere"], capsys)
        assert "--task-file none.toml: no such file" in one_line_exit(main, ["--task-file", "none.toml"], capsys)
    line = one_line_exit(R.main, ["--env", SYN, "--out", str(blocker / "run")], capsys)
    assert f"cannot write {blocker / 'run'}" in line
    line = one_line_exit(C.main, ["--rule", "maxprob", "--task", "RTE", "--out", str(blocker / "cal")], capsys)
    assert f"cannot write {blocker / 'cal'}" in line
    line = one_line_exit(predict.main, ["--checkpoint", str(tmp_path), "--rule", "static-1", "--text", "x", "--out",
                                        str(blocker / "p.tsv")], capsys)
    assert f"cannot write {blocker}" in line


def test_a_failed_write_is_one_line_naming_the_path(ckpt, tmp_path, monkeypatch, capsys):
    import os

    from agents.predict import main
    from backbones.files import WriteError

    real = os.replace

    def disk_full(src, dst):
        if str(dst).endswith("p.tsv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    out = tmp_path / "p.tsv"
    line = one_line_exit(main, ["--checkpoint", str(ckpt), "--rule", "static-1", "--text", "a good film",
                                "--out", str(out)], capsys)
    assert line == f"error: cannot write {out}: the disk is full; free space, fix the folder's permissions or " \
                   "write elsewhere (--out)"
    assert not out.exists() and not list(tmp_path.glob(".p.tsv*"))  # no half-written or temporary file left
    with pytest.raises(WriteError, match="the disk is full"):
        write_json(tmp_path / "p.tsv", {})


def test_tensorboard_folder_that_cannot_be_written_is_named_before_any_work(tmp_path):
    from backbones.files import WriteError, summary_writer

    blocker = tmp_path / "tb"
    blocker.write_text("a file where the TensorBoard folder should be")
    with pytest.raises(WriteError, match=f"cannot write {blocker / 'run'}: {blocker} is a file"):
        summary_writer(blocker / "run")
    w = summary_writer(tmp_path / "ok" / "run")  # a folder that can be created is fine
    w.add_scalar("x", 1.0, 0)
    w.close()
    assert list((tmp_path / "ok" / "run").glob("events.out.tfevents.*"))
