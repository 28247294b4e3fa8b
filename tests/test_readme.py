"""The README's own-task commands run as written (with a tiny model appended) on a fixture task."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import make_rows

from backbones.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def readme_block(after: str, lang: str) -> str:
    """The first ```lang block after the line containing ``after``."""
    tail = README[README.index(after):]
    m = re.search(rf"```{lang}\n(.*?)```", tail, re.S)
    assert m, f"no {lang} block after {after!r}"
    return m.group(1)


def test_readme_is_a_short_guide():
    assert len(README.splitlines()) <= 200


def test_own_task_commands_run_as_written(tmp_path, tiny_encoder_dir):
    toml = readme_block("Your own task is a small TOML", "toml")
    name = re.search(r'name = "(\w+)"', toml).group(1)
    files = {k: re.search(rf'{k} = "([^"]+)"', toml).group(1) for k in ("train", "dev")}
    col, label = re.search(r'text_a = "(\w+)"', toml).group(1), re.search(r'label = "(\w+)"', toml).group(1)
    for split, n, seed in (("train", 60, 1), ("dev", 24, 2)):
        rows = make_rows(n, seed)
        (tmp_path / files[split]).write_text(f"{col},{label}\n" + "".join(f"{s},{'pos' if y else 'neg'}\n" for s, y in rows))
    (tmp_path / "intents.toml").write_text(toml)
    env = {**os.environ, "CEE_RUNS_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(REPO_ROOT)}
    tiny = {  # what makes the commands fit a test: a tiny encoder, one short epoch
        "backbones.train": ["--model", str(tiny_encoder_dir), "--epochs", "1", "--batch-size", "8", "--max-length", "32",
                            "--lr", "3e-3", "--head-lr", "1e-2"],
        "agents.reinforce": ["--epochs", "1", "--checkpoint",  # the backbone the first command trained
                             str(tmp_path / "runs" / "stage1" / f"{name}-{tiny_encoder_dir.name}-cls-eq1-s0-holdout0.3")],
        "agents.predict": [],
    }
    commands = [line for line in readme_block("Your own task is a small TOML", "bash").splitlines() if line.strip()]
    assert [c.split()[2] for c in commands] == list(tiny)
    for cmd in commands:
        argv = shlex.split(cmd.split("#")[0])
        assert argv[:2] == ["python", "-m"]
        r = subprocess.run([sys.executable, *argv[1:], *tiny[argv[2]]], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = r.stdout.splitlines()
    assert out[0].split("\t")[:3] == ["index", "label", "exit_layer"] and len(out) == 1 + 24
    run = re.search(r"--run (\S+)", commands[-1]).group(1)  # the folder the README's reinforce command names
    assert (tmp_path / run / "policy.json").is_file() and json.loads((tmp_path / run / "policy.json").read_text())[
        "task"] == name
    assert Path(tmp_path / "runs" / "stage1").is_dir()
