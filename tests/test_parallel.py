"""Fits on Ray workers (agents.parallel): the same results as one after another; Ray only with the flags.

The Ray tests start one local Ray (2 CPUs; start-up takes seconds, tens of seconds on a busy machine) for the
module: the benchmark on synthetic caches and a map with a failing fit; marked slow, a larger benchmark and
agents.compare (reinforce and PPO).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from backbones.paths import REPO_ROOT


def _bench_cfg(out, **kw):
    from agents.benchmark import BenchmarkConfig
    from agents.policies.heuristics import LTEConfig

    kw = {"learners": ("reinforce:confidence:consistency", "fqi:confidence:consistency"), "alphas": (0.05, 0.2), **kw}
    return BenchmarkConfig(epochs=1, grid=7, lte=LTEConfig(epochs=2), out=str(out), quiet=True, plots=False,
                           ltt_resplits=20, reuse=False, **kw)


def _bench_caches():
    from cee_env import make_synthetic_cache

    kw = dict(num_layers=4, hidden=10, seed=0)
    return {"calib": make_synthetic_cache(n=96, split="calib", **kw), "dev": make_synthetic_cache(n=64, split="dev", **kw)}


def test_serial_runs_never_import_ray(tmp_path):
    """Without --workers / --ray-address the benchmark and compare run in this process: Ray is not imported."""
    code = f"""
import sys
from agents import benchmark, compare
benchmark.main(["--tasks", "Synthetic", "--alphas", "0.1", "--learners", "fqi:confidence:consistency", "--epochs", "1",
                "--grid", "5", "--ltt-resplits", "0", "--lte.epochs", "1", "--out", {str(tmp_path / 'b')!r}, "--no-plots", "--quiet"])
compare.main(["--env", "cee/Synthetic-v0", "--algos", "reinforce", "--seeds", "2", "--budget", "2000", "--quiet"])
assert "ray" not in sys.modules, "ray was imported"
print("no ray")
"""
    env = {"CEE_RUNS_DIR": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "no ray" in r.stdout, (r.stdout + r.stderr)[-3000:]


def test_workers_without_ray_say_how_to_install(monkeypatch, capsys, tmp_path):
    from agents import benchmark, compare

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import ray fails, find_spec finds nothing
    for main, argv in ((benchmark.main, ["--tasks", "Synthetic", "--workers", "2", "--out", str(tmp_path)]),
                       (compare.main, ["--env", "cee/Synthetic-v0", "--ray-address", "auto"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "pip install 'consistentee-gym[ray]'" in err[0], err
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--tasks", "Synthetic", "--workers", "-1"])
    assert e.value.code == 2 and "--workers must be >= 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_ray():
    """Ray, started by the first fit_map with workers=2 (one start-up for the module), shut down at the end."""
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()


def test_ray_workers_give_the_serial_benchmark(local_ray, tmp_runs, tmp_path):
    """A local Ray with 2 CPUs: the benchmark's results.json (every point, the operating points, risk control)
    equals the serial run's; results come back in job order whatever finishes first; failed fits are named."""
    from agents.benchmark import run_benchmark
    from agents.parallel import FitFailed, fit_map

    caches = {"SynA": _bench_caches()}
    kw = dict(learners=("fqi:confidence:consistency",), alphas=(0.1,))
    run_benchmark(caches, _bench_cfg(tmp_path / "serial", **kw))
    assert "ray" not in sys.modules or not local_ray.is_initialized()
    par = run_benchmark(caches, _bench_cfg(tmp_path / "ray", workers=2, **kw))
    assert local_ray.is_initialized()
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("serial", "ray"))
    assert a["operating_points"] == b["operating_points"] and a["risk_control"] == b["risk_control"]
    assert a["points"] == b["points"] and len(a["points"]) > 50
    assert par["timing"]["SynA"]["learned_paths"] == 2  # berxit + 1 learner x 1 alpha

    def slow_then_fail(i, delay, shared):  # a closure: Ray ships it by value
        time.sleep(delay)
        if i == 2:
            raise ValueError(f"bad row in fit {i}")
        return i * shared

    assert fit_map(slow_then_fail, [(0, 2.0), (1, 0.0), (3, 0.5)], ["a", "b", "c"], shared=10, workers=2) == [0, 10, 30]
    with pytest.raises(FitFailed, match=r"1 of 3 fits failed.*fit-two: ValueError: bad row in fit 2"):
        fit_map(slow_then_fail, [(0, 0.0), (2, 0.0), (1, 0.0)], ["fit-one", "fit-two", "fit-three"], shared=1, workers=2)


@pytest.mark.slow  # SB3 in the workers, two learners: minutes on a busy 2-core machine
def test_ray_workers_give_the_serial_compare_and_larger_benchmark(local_ray, tmp_runs, tmp_path):
    from agents.benchmark import run_benchmark
    from agents.compare import Args, compare
    from cee_env import make_synthetic_cache

    caches = {"SynA": _bench_caches()}
    a, b = (run_benchmark(caches, _bench_cfg(tmp_path / d, workers=w)) for d, w in (("serial", 0), ("ray", 2)))
    assert a["points"] == b["points"] and a["operating_points"] == b["operating_points"]
    assert b["timing"]["SynA"]["learned_paths"] == 1 + 2 * 2  # berxit + 2 learners x 2 alphas

    cmp_caches = {s: make_synthetic_cache(n=128, num_layers=4, hidden=10, split=s, seed=1) for s in ("train", "dev")}
    kw = dict(env="cee/Synthetic-v0", algos="reinforce,ppo", seeds=2, budget=2_000, reward="vanilla", alpha=0.3,
              n_envs=2, quiet=True)
    one = compare(Args(**kw, name="serial"), cmp_caches)
    two = compare(Args(**kw, name="ray", workers=2), cmp_caches)
    assert one["iqm"] == two["iqm"] and one["reference"] == two["reference"]
    assert [(r["algo"], r["seed"], r["dev"], r["env_steps"]) for r in one["runs"]] == \
        [(r["algo"], r["seed"], r["dev"], r["env_steps"]) for r in two["runs"]]
