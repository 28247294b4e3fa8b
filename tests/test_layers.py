"""The layers contract: imports point one way, agents -> cee_env -> backbones (import-linter, pyproject.toml)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from backbones.paths import REPO_ROOT

PACKAGES = ("agents", "cee_env", "backbones")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the packages under root shadow the installed ones
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())"], cwd=root, env=env, capture_output=True, text=True)


def copy_tree(dst: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO_ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_code_keeps_the_layers_contract(tmp_path):
    r = lint(copy_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    root = copy_tree(tmp_path)
    with open(root / "backbones" / "paths.py", "a") as f:
        f.write("\nimport cee_env.rewards  # noqa: E402,F401  (an upward import)\n")
    r = lint(root)
    assert r.returncode != 0 and "BROKEN" in r.stdout and "backbones.paths -> cee_env.rewards" in r.stdout, r.stdout
