"""backbones.cli: flags from one dataclass (tyro), user errors as one line with exit code 2; the entry points."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, fields

import pytest
from tyro._docstrings import get_field_docstring  # tyro's own lookup: what --help shows for a field

from backbones.cli import Repeatable, UserError, parse, user_errors
from backbones.paths import REPO_ROOT

# (module with main(argv), its config dataclass)
ENTRY_POINTS = [
    ("backbones.train", "TrainConfig"),
    ("agents.rl.backbone_stage", "StageConfig"),
    ("backbones.llm.train", "Stage1Args"),
    ("agents.llm.decode", "DecodeArgs"),
    ("agents.llm.eval", "EvalArgs"),
    ("agents.predict", "PredictArgs"),
    ("agents.cotrain", "Args"),
    ("benchmarks.env_throughput", "Args"),
    ("benchmarks.inference_speed", "Args"),
    ("benchmarks.llm_speed", "Args"),
    ("benchmarks.exit_ceiling", "Args"),
    ("agents.reinforce", "Args"),
    ("agents.sb3", "Args"),
    ("agents.fqi", "Args"),
    ("agents.compare", "Args"),
    ("agents.benchmark", "BenchmarkConfig"),
    ("agents.calibrate", "Args"),
    ("cee_env.build_caches", "Args"),
]


@dataclass
class Demo:
    name: str = "x"
    """a name"""
    count: int | None = None
    """how many; None: all"""
    fast: bool = False
    """go fast"""
    sizes: tuple[int, ...] = (1, 2)
    """sizes"""
    text: Repeatable = ()
    """one text per flag"""


def test_parse_dashes_bools_none_and_lists():
    assert parse(Demo, []) == Demo()
    d = parse(Demo, ["--name", "y", "--count", "3", "--fast", "--sizes", "4", "5", "--text", "a", "--text", "b c"])
    assert d == Demo("y", 3, True, (4, 5), ("a", "b c"))
    assert parse(Demo, ["--count", "None", "--no-fast"]) == Demo()


def test_parse_usage_errors_exit_2(capsys):
    for argv in (["--count", "many"], ["--nope"]):
        with pytest.raises(SystemExit) as e:
            parse(Demo, argv)
        assert e.value.code == 2
    assert "--nope" in capsys.readouterr().err


def failing(exc: BaseException):
    @user_errors
    def main(argv=None):
        raise exc

    return main


@pytest.mark.parametrize("exc,line", [
    (UserError("--epochs must be >= 1; got 0"), "error: --epochs must be >= 1; got 0"),
    (FileNotFoundError("input file not found: x.txt"), "error: input file not found: x.txt"),
    (ValueError("two\n  lines"), "error: two lines"),
])
def test_user_errors_end_with_one_line_and_exit_2(capsys, monkeypatch, exc, line):
    monkeypatch.delenv("CEE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        failing(exc)()
    assert e.value.code == 2 and capsys.readouterr().err == line + "\n"


def test_debug_flag_and_other_errors_keep_the_traceback(monkeypatch):
    monkeypatch.setenv("CEE_DEBUG", "1")
    with pytest.raises(UserError):
        failing(UserError("x"))()
    monkeypatch.delenv("CEE_DEBUG")
    with pytest.raises(RuntimeError):  # a bug, not a user error
        failing(RuntimeError("x"))()
    assert user_errors(lambda argv=None: 7)() == 7


@pytest.mark.parametrize("module,cls", ENTRY_POINTS)
def test_help_explains_every_flag(module, cls, capsys):
    mod = importlib.import_module(module)
    config = getattr(mod, cls)
    undocumented = [f.name for f in fields(config) if not get_field_docstring(config, f.name, ())]
    assert not undocumented, f"{module}.{cls}: fields without a docstring: {undocumented}"
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in fields(config):
        assert "--" + f.name.replace("_", "-") in text


# --------------------------------------------------------------------------- backbones.train
def test_train_range_checks_name_the_flag():
    from backbones.train import TrainConfig

    for kw, msg in [(dict(epochs=0), "--epochs must be >= 1; got 0"), (dict(batch_size=0), "--batch-size"),
                    (dict(lr=0.0), "--lr must be a finite number > 0"), (dict(lr=float("nan")), "--lr"),
                    (dict(head_lr=-1.0), "--head-lr"), (dict(holdout=1.0), "--holdout must be in [0, 1)"),
                    (dict(folds=1), "--folds must be 0 (off) or >= 2"), (dict(folds=3, fold=3), "--fold must be in 0..2"),
                    (dict(fold=1), "--fold needs --folds"), (dict(holdout=0.2, folds=2), "exclude each other")]:
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            TrainConfig(**kw).resolved()
    TrainConfig(task="RTE", epochs=1, holdout=0.5).check()
    TrainConfig(task="RTE", folds=5, fold=4).check()


@pytest.mark.parametrize("argv,line", [
    (["--task", "Nope"], "error: unknown task 'Nope'; known tasks: RTE, "),
    (["--epochs", "0"], "error: --epochs must be >= 1; got 0"),
    (["--task-file", "{tmp}/absent.toml"], "error: task file not found: {tmp}/absent.toml"),
    (["--task", "RTE", "--train-file", "{tmp}/absent.tsv"], "error: RTE train file not found: {tmp}/absent.tsv"),
])
def test_train_user_errors(tmp_path, tmp_runs, tiny_encoder_dir, capsys, monkeypatch, argv, line):
    import backbones.train as tr

    monkeypatch.delenv("CEE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        tr.main([a.format(tmp=tmp_path) for a in argv] + ["--model", str(tiny_encoder_dir)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(line.format(tmp=tmp_path)) and err.count("\n") == 1, err
    assert not any(tmp_runs.iterdir()), "nothing is written for a user error"


def test_exit_code_2_and_one_line_from_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CEE_RUNS_DIR": str(tmp_path)}
    env.pop("CEE_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "backbones.train", "--epochs", "0"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: --epochs must be >= 1; got 0\n", r.stderr


# --------------------------------------------------------------------------- the other commands
def test_llm_flags_keep_their_spelling():
    from backbones.llm.train import Stage1Args

    a = parse(Stage1Args, ["--no-affine", "--loss", "hard", "--n-prompts", "48", "--per-prompt", "16"])
    assert (a.affine, a.loss, a.n_prompts, a.per_prompt, a.compare) == (False, "hard", 48, 16, ())
    assert parse(Stage1Args, ["--compare", "h1", "h2"]).compare == ("h1", "h2")


@pytest.mark.parametrize("module,argv,line", [
    ("agents.llm.eval", ["--alphas", "0.5,x"], "error: --alphas expects comma-separated numbers; got '0.5,x'"),
    ("agents.llm.eval", ["--policy-points", "0.3:0.1"], "error: --policy-points 0.3:0.1: alpha 0.3 is not in --alphas"),
    ("agents.llm.decode", ["--prompt", "hi", "--rule", "policy"], "error: --rule policy needs --policy"),
    ("agents.cotrain", ["--env", "cee/Nope-v0"], "error: unknown task 'Nope'"),
    ("agents.cotrain", ["--env", "Nope"], "error: --env Nope: Environment `Nope` doesn't exist."),
    ("benchmarks.inference_speed", ["--checkpoint", "ck"], "error: --checkpoint / --dev-file need exactly one task"),
    ("benchmarks.exit_ceiling", ["--pca", "0"], "error: --max-drop must be a finite number >= 0 and --pca >= 1"),
    ("benchmarks.exit_ceiling", ["--tasks", "Nope"], "error: unknown task 'Nope'"),
])
def test_user_errors_before_any_model_loads(module, argv, line, capsys, monkeypatch):
    monkeypatch.delenv("CEE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,msg", [
    (["--alpha", "nan"], "--alpha must be a finite number >= 0"),
    (["--alpha", "inf"], "--alpha must be a finite number >= 0"),
    (["--alpha", "-0.1"], "--alpha must be a finite number >= 0"),
    (["--k", "1"], "--k must be >= 2"),
    (["--k", "0"], "--k must be >= 2"),
    (["--total-env-steps", "0"], "--total-env-steps must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--train-split", "dev"], "--train-split must be calib"),
])
def test_reinforce_refuses_nonsense_before_training(argv, msg, capsys, monkeypatch, tmp_path):
    """Each of these used to train and save a meaningless policy (issue 16); now: one line, exit 2, nothing written."""
    from agents import reinforce

    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path))
    monkeypatch.delenv("CEE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        reinforce.main(["--env", "cee/Synthetic-v0", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "reinforce").exists()
