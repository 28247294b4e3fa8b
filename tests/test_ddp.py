"""Stage-1 training under DDP: 2 CPU processes started by ``accelerate launch`` (subprocesses, tiny model).

How to get 2 CPU processes from accelerate 1.15: ``--cpu`` alone picks the *simple* launcher, which
starts ONE process whatever ``--num_processes`` says (it only spreads over processes with
``--mpirun_hostfile``). The torchrun-based launcher (``--multi_gpu``) with ``ACCELERATE_USE_CPU=true``
in the environment starts 2 processes that join a gloo process group on the CPU::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m backbones.train --task RTE ...

In-process user tasks do not exist in the subprocesses, so the tiny task is written in GLUE RTE's
format and passed with ``--task RTE --train-file ... --dev-file ...``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backbones.paths import REPO_ROOT

ACCELERATE = Path(sys.executable).with_name("accelerate")
pytestmark = pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate CLI not installed beside python")

# A wrapper that crashes on the k-th training step (both ranks at the same step, so neither hangs in
# a collective), to test resuming under DDP.
CRASHING_TRAIN = """
import os, sys
import backbones.train as tr
crash_at, real, calls = int(os.environ["CEE_TEST_CRASH_AT"]), tr.weighted_exit_loss, []
def loss(*a, **k):
    calls.append(1)
    if len(calls) == crash_at:
        raise RuntimeError(f"simulated crash at step {crash_at}")
    return real(*a, **k)
tr.weighted_exit_loss = loss
tr.main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, target: list[str], train_args: list[str], extra_env: dict | None = None):
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "CEE_RUNS_DIR": str(tmp_path / "runs"),
        "CEE_DATA_DIR": str(tmp_path),  # never read: every split comes from a file path
        "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config file can change the launch
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        **(extra_env or {}),
    }
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           *target, *train_args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def train_args(files, model_dir, out, *more) -> list[str]:
    return ["--task", "RTE", "--train-file", str(files["train"]), "--dev-file", str(files["dev"]),
            "--model", str(model_dir), "--out", str(out), "--epochs", "2", "--batch-size", "8",
            "--lr", "3e-3", "--head-lr", "1e-2", "--max-length", "32", *more]


def check_complete(out: Path, n_train: int = 60, n_dev: int = 30, epochs: int = 2) -> dict:
    for name in ("model.safetensors", "multiexit.json", "metrics.json", "train_correct.npy", "train_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "state").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "RTE" and metrics["num_layers"] == 2
    assert metrics["dev"]["n"] == n_dev and len(metrics["dev"]["layer_metric"]) == 2
    correct = np.load(out / "train_correct.npy")
    assert correct.shape == (epochs, n_train, 2)
    assert (correct >= 0).all(), "train_correct misses instances seen by the other process"
    from backbones.multiexit import MultiExitEncoder

    assert MultiExitEncoder.load(out).num_layers == 2
    return metrics


def test_ddp_two_cpu_processes(tmp_path, tiny_rte_files, tiny_encoder_dir):
    out = tmp_path / "ddp"
    r = launch(tmp_path, ["-m", "backbones.train"], train_args(tiny_rte_files, tiny_encoder_dir, out))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    # 60 instances / (2 processes x 8) -> 4 steps per epoch; printed once, by the main process
    assert log.count("2 epochs x 4 steps on 2 process(es)") == 1, log[-4000:]
    check_complete(out)
    assert (tmp_path / "runs" / "tb" / "stage1" / "ddp").is_dir()

    # The joint variant (Eq 6 + Eq 5) on top of it: the policy is a second DDP-wrapped module.
    from backbones.multiexit import MultiExitEncoder
    from agents.policies.net import LayerMLPPolicy

    hidden = MultiExitEncoder.load(out).encoder.config.hidden_size
    LayerMLPPolicy(hidden, 2, hidden=8).save(tmp_path / "policy0", extra={"task": "RTE"})
    np.save(tmp_path / "mem.npy", np.full(60, 2))
    joint = tmp_path / "joint"
    args = train_args(tiny_rte_files, tiny_encoder_dir, joint, "--init-from", str(out), "--objective", "joint",
                      "--exit-policy", str(tmp_path / "policy0"), "--memorized", str(tmp_path / "mem.npy"),
                      "--policy-lr", "1e-2")
    r = launch(tmp_path, ["-m", "agents.rl.backbone_stage"], args)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    check_complete(joint)
    from safetensors.numpy import load_file

    p0, p1 = load_file(str(tmp_path / "policy0" / "policy.safetensors")), load_file(str(joint / "policy" / "policy.safetensors"))
    assert any(not np.allclose(p0[k], p1[k]) for k in ("w1", "w2", "b2"))


@pytest.mark.slow  # two more launches (~15-40 s on a busy 2-core machine)
def test_ddp_resume_after_crash(tmp_path, tiny_rte_files, tiny_encoder_dir):
    """2 epochs x 4 steps, save_every=2: crash at step 7 -> last save at step 6 (epoch 2, batch 2)."""
    out = tmp_path / "ddp"
    script = tmp_path / "crashing_train.py"
    script.write_text(CRASHING_TRAIN)
    args = train_args(tiny_rte_files, tiny_encoder_dir, out, "--save-every", "2")
    r = launch(tmp_path, [str(script)], args, {"CEE_TEST_CRASH_AT": "7"})
    assert r.returncode != 0 and "simulated crash at step 7" in r.stdout + r.stderr, (r.stdout + r.stderr)[-4000:]
    assert not (out / "metrics.json").exists()
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert {k: progress[k] for k in ("epoch", "step_in_epoch", "global_step")} == {"epoch": 1, "step_in_epoch": 2,
                                                                                   "global_step": 6}
    assert not (out / "state.new").exists()  # written there, then swapped for state/
    partial = np.load(out / "state" / "train_correct.npy")
    assert (partial[0] >= 0).all() and (partial[1] >= 0).sum() == 2 * 16 * 2  # 2 steps x 2 processes x 8

    r = launch(tmp_path, ["-m", "backbones.train"], args)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert log.count("resuming ddp at epoch 2, step 2") == 1, log[-4000:]
    check_complete(out)


def cache_folders(runs: Path) -> dict[str, Path]:
    return {p.name.split("-")[0]: p for p in (runs / "cache" / "RTE").iterdir() if p.is_dir()}


def test_cache_built_by_two_processes_is_byte_identical(tmp_path, tiny_rte_files, tiny_encoder_dir, monkeypatch):
    """`accelerate launch` of cee_env.build_caches on 2 CPU processes writes the caches one process writes, byte
    for byte (states, log-probs, labels, meta.json with fingerprint and checksums); a corrupt cache found there is
    rebuilt. Batch size 4: calib (18 rows) and test (30 rows) give 5 and 8 batches, the short last one on rank 0
    and on rank 1 respectively."""
    from backbones.train import TrainConfig, train
    from cee_env.cache import get_cache

    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path / "one"))
    train(TrainConfig(task="RTE", model=str(tiny_encoder_dir), train_file=str(tiny_rte_files["train"]),
                      dev_file=str(tiny_rte_files["dev"]), out=str(ckpt), holdout=0.3, epochs=1, batch_size=8,
                      max_length=32, save_every=0))
    for split in ("calib", "test"):
        get_cache("RTE", split, checkpoint=ckpt, test_file=str(tiny_rte_files["dev"]), batch_size=4, verbose=False)
    one = cache_folders(tmp_path / "one")
    assert sorted(one) == ["calib", "test"]

    damaged = tmp_path / "runs" / "cache" / "RTE" / one["calib"].name  # a corrupt copy where the launch looks
    shutil.copytree(one["calib"], damaged)
    lp = bytearray((damaged / "log_probs.npy").read_bytes())
    lp[-1] ^= 0xFF
    (damaged / "log_probs.npy").write_bytes(bytes(lp))

    r = launch(tmp_path, ["-m", "cee_env.build_caches"],
               ["--task", "RTE", "--checkpoint", str(ckpt), "--splits", "calib", "test", "--test-file",
                str(tiny_rte_files["dev"]), "--batch-size", "4"])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "checksum mismatch" in log and log.count("on 2 processes") == 2, log[-4000:]
    # the main process's progress bar counts its own batches: 3 of calib's 5, 4 of test's 8
    assert re.search(r"caching RTE/calib: .*\b0/3\b", log) and re.search(r"caching RTE/test: .*\b0/4\b", log), log
    assert not re.search(r"caching RTE/(calib|test): .*\b0/(5|8)\b", log), log
    assert log.count("RTE/calib: 18 instances x 2 layers") == 1, log[-4000:]  # printed by the main process only
    two = cache_folders(tmp_path / "runs")
    assert sorted(two) == ["calib", "test"] and two["calib"].name == one["calib"].name
    for split in one:
        names = sorted(p.name for p in one[split].iterdir())
        assert names == sorted(p.name for p in two[split].iterdir()) == ["labels.npy", "log_probs.npy", "meta.json",
                                                                        "states.npy"]
        for name in names:
            assert (one[split] / name).read_bytes() == (two[split] / name).read_bytes(), (split, name)
    assert not list((tmp_path / "runs" / "cache" / "RTE").glob(".*.shards"))  # the shards were merged and removed
