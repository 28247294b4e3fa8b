"""Learned exits against the confidence heuristics: every knob chosen on calib, every score reported on test.

    python -m agents.benchmark                                            # RTE, MRPC, SST2, MCID, StackOverflow
    python -m agents.benchmark --tasks MCID --test-file MCID=path/to/labelled_test.tsv

Data roles (:mod:`backbones.protocol`): the stage-1 backbone fits *fit*; every method learns
and chooses on *calib* (training rows the deployed backbone never saw: a held-out fraction,
the spare rows of a subset task, or out-of-fold outputs under ``--protocol crossfit``); the
*test* sets are reported once and never read while choosing: the task's dev file (no
labelled GLUE test exists, so GLUE dev plays the test set) and every ``--test-file``.

Methods: each gives a score per instance and layer and exits at the first layer whose
score passes its knob (the last layer always exits).

- heuristics: static exit at layer k; DeeBERT (entropy); Right-Tool (max probability);
  PABEE (patience count);
- BERxiT: a learned exit head (linear + sigmoid on the pooled state, "is this layer right?");
- learned policies in the environment (``--learners ALGO:OBS:REWARD``): REINFORCE (Eq 5)
  or fitted Q iteration (``agents.fqi``), one policy per alpha, any observation mode and
  reward; each twice: the paper's rule (pi > 0.5, alpha chosen) and with the exit
  threshold chosen too.

Learned methods are cross-fitted on calib so that the knob is chosen on the kind of rule that is
deployed: ``--calib-folds`` K models, each trained on K-1 folds, score the fold they did not see,
and (``--deploy refit``, the default) one model refitted on all of calib is deployed; ``--deploy
nested`` deploys the mean of the K models and scores each calib row by the mean of K models
trained on inner folds of the other folds; ``mean`` deploys the mean while calib is scored by
single models (the mismatch before issue 21). ``--calib-repeats R``: R fold splits, each calib
row's out-of-fold scores averaged. Heuristics choose on the whole of calib.

Operating points, chosen on calib for every method alike: "no loss" = the most saved layers
with a calib score >= the full-depth calib score; "<= 1 pt" = at most ``--max-drop`` below.
The headline of each task compares the learned method and the heuristic that are best on
calib at "<= 1 pt" (most saved calib layers), with the test score and saved layers of the
knob they chose. Saved layers = 1 - avg exit layer / L.

Writes under --out (default runs/benchmark/): table.md, results.json (every point on every
split), <task>_curves.png (metric vs saved layers on calib and test) and
fig4_reward_ablation.png (Eq 3 vs Eq 4 with the paper's rule, on the test splits).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from agents.evaluate import EvalResult, score_exits
from agents.policies.heuristics import LTEConfig, BerxitExit, max_prob, patience_counters, prediction_entropy, train_lte
from backbones.cli import Repeatable
from cee_env.cache import LayerCache

DEFAULT_TASKS = ("RTE", "MRPC", "SST2", "MCID", "StackOverflow")
DEFAULT_LEARNERS = ("reinforce:state:hardness", "reinforce:state:vanilla", "reinforce:confidence:consistency",
                    "ppo:confidence:consistency", "fqi:confidence:consistency")
ALGOS = ("reinforce", "fqi", "ppo", "a2c", "dqn")
HEURISTICS = {"static": "Static exit at layer k", "deebert": "DeeBERT (entropy)",
              "maxprob": "Right-Tool (max prob)", "pabee": "PABEE (patience)"}
REWARD_LABEL = {"hardness": "Eq 4", "vanilla": "Eq 3", "hardness_weighted": "Eq 4 alt.",
                "accuracy": "0/1 accuracy", "consistency": "0/1 consistency"}
SPLIT_NOTE = {"calib": "calib (where knobs are chosen)", "dev": "dev (a test set: never read while choosing)",
              "test": "test file (never read while choosing)"}


@dataclass
class BenchmarkConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    """tasks to run"""
    learners: tuple[str, ...] = DEFAULT_LEARNERS
    """learned policies as ALGO:OBS:REWARD (algo reinforce or fqi; obs an env observation mode; reward an env reward)"""
    alphas: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    """depth penalties to sweep, one policy per alpha and fold"""
    calib_folds: int = 2
    """cross-fitting folds of calib for the learned methods"""
    deploy: str = "refit"
    """the learned methods' deployed rule and the calib scores its knob is chosen on: refit (one model trained on
    all of calib; calib scored by single out-of-fold models), nested (the mean of the K fold models; calib scored
    by the mean of K inner-fold models) or mean (the mean of the K fold models while calib is scored by single
    out-of-fold models: the rule chosen is not the rule deployed; the behaviour before issue 21). refit saved the
    most on held-out calib rows (docs/benchmark.md, benchmarks.deploy_modes)"""
    calib_repeats: int = 1
    """repeated cross-fitting: this many fold splits of calib, each row's calib score averaged over its
    out-of-fold models, the deployed rule the mean of all folds x repeats models (less variance, more training)"""
    max_drop: float = 0.01
    """the '<= 1 pt' operating point allows this drop below full depth on calib (0.01 = 1 point)"""
    epochs: int = 20
    """REINFORCE epochs per policy"""
    sb3_steps: int = 100_000
    """env steps per SB3 policy (learners ppo / a2c / dqn)"""
    seed: int = 0
    """seed of the calib folds and of every policy"""
    grid: int = 61
    """thresholds per score: quantiles of the score on calib (plus fixed points)"""
    protocol: str | None = None
    """calib protocol: holdout or crossfit (default: each task's, backbones.protocol.default_protocol)"""
    model: str | None = None
    """backbone: all-MiniLM-L6-v2 (default), all-mpnet-base-v2 (12 layers), smollm2 (30-layer decoder) or a
    Hugging Face path; each task's deployed checkpoint for it is trained if missing"""
    test_file: Repeatable = ()
    """TASK=PATH: a labelled test file for a task (repeatable); reported with the calib-chosen knobs"""
    checkpoint: Repeatable = ()
    """TASK=PATH: the deployed stage-1 checkpoint of a task (repeatable; default: the protocol's, trained if missing)"""
    data_dir: str | None = None
    """data directory (default $CEE_DATA_DIR or ../shared/data)"""
    out: str | None = None
    """output folder (default runs/benchmark, runs/benchmark-<model> with another --model)"""
    threads: int = 1
    """torch threads while training policies (backbones and caches are built with every core)"""
    plots: bool = True
    """write the PNG figures"""
    quiet: bool = False
    """print only the tables"""
    ltt: tuple[str, ...] = ("consistency:0.02:0.1", "consistency:0.05:0.1", "accuracy_gap:0.02:0.1")
    """risk-controlled operating points RISK:EPSILON:DELTA (agents.calibrate's Learn-then-Test) for every method"""
    reuse: bool = True
    """load a learner's policy saved by an earlier run when its settings and training rows are the same
    (benchmark_key.json beside it) instead of training it again; --no-reuse retrains everything"""
    ltt_resplits: int = 200
    """calibration sets re-drawn (i.i.d. from calib+test as the population) to check each guarantee: the violation frequency must stay <= delta; 0: skip"""
    lte: LTEConfig = field(default_factory=LTEConfig)
    """how the BERxiT exit head is fitted"""
    workers: int = 0
    """run the independent knob paths (method x alpha) on this many local Ray workers (extra 'ray'); 0: one
    after another in this process. Results are the same either way"""
    ray_address: str | None = None
    """run them on the Ray cluster at this address (e.g. ray://head:10001 or auto) instead"""


# --------------------------------------------------------------------------- scores and points
def exits_at(score: np.ndarray, threshold: float) -> np.ndarray:
    """0-based exit layer: the first layer whose score is above ``threshold`` (the last layer otherwise)."""
    m = score > threshold
    m[:, -1] = True
    return m.argmax(1)


def make_point(task: str, method: str, knob: dict, split: str, res: EvalResult) -> dict:
    """One (method, knob) on one split. Test-side points keep their per-instance exit layers in ``_exits`` (for the
    headline's paired confidence interval; dropped before anything is written)."""
    p = {"task": task, "method": method, "knob": knob, "split": split, "metric_name": res.metric_name,
         "metric": res.metric, "accuracy": res.accuracy, "saved": res.saved_layers, "avg_exit": res.avg_exit_layer,
         "num_layers": res.num_layers, "n": res.n, "exit_hist": res.exit_hist}
    if split != "calib":
        p["_exits"] = np.asarray(res.exit_layers, dtype=np.int8)
    return p


def threshold_grid(calib_score: np.ndarray, n: int, fixed: tuple[float, ...] = ()) -> list[float]:
    """Quantiles of the calib score at layers 1..L-1, the fixed points, and +inf (never exit early)."""
    v = np.asarray(calib_score[:, :-1], dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    qs = np.quantile(v, np.linspace(0, 1, n)) if v.size else np.array([])
    grid = {round(float(t), 6) for t in np.concatenate([qs, np.asarray(fixed, dtype=np.float64)])}
    return sorted(grid) + [float("inf")]


def score_points(task: str, method: str, scores: dict[str, np.ndarray], caches: dict[str, LayerCache],
                 knobs: list[tuple[dict, float]]) -> list[dict]:
    """Points of one score family: every (knob, threshold) on every split."""
    out = []
    for split, s in scores.items():
        for knob, thr in knobs:
            e = exits_at(s, thr)
            out.append(make_point(task, method, knob, split, score_exits(e, caches[split], method)))
    return out


def heuristic_scores(cache: LayerCache) -> dict[str, np.ndarray]:
    return {"deebert": -prediction_entropy(cache.log_probs), "maxprob": max_prob(cache.log_probs),
            "pabee": patience_counters(cache.preds).astype(np.float64)}


def sweep_heuristics(task: str, caches: dict[str, LayerCache], cfg: BenchmarkConfig) -> list[dict]:
    """Full depth, oracle, static exits and the three confidence rules on every split."""
    L = caches["calib"].num_layers
    points = []
    for split, c in caches.items():
        for k in range(1, L + 1):
            res = score_exits(np.full(c.num_instances, k - 1), c, f"static-{k}")
            points.append(make_point(task, "static", {"k": k}, split, res))
            if k == L:
                points.append(make_point(task, "full", {}, split, res))
        orc = np.where((c.preds == c.labels[:, None]).any(1), (c.preds == c.labels[:, None]).argmax(1), L - 1)
        points.append(make_point(task, "oracle", {}, split, score_exits(orc, c, "oracle")))
    scores = {split: heuristic_scores(c) for split, c in caches.items()}
    for method in ("deebert", "maxprob", "pabee"):
        if method == "pabee":
            thrs = [p - 0.5 for p in range(1, L)] + [float("inf")]
        else:
            thrs = threshold_grid(scores["calib"][method], cfg.grid)
        knobs = [({"threshold": t}, t) for t in thrs]
        points += score_points(task, method, {s: v[method] for s, v in scores.items()}, caches, knobs)
    return points


def take(cache: LayerCache, idx: np.ndarray) -> LayerCache:
    """The instances ``idx`` of a cache, as a cache of their own."""
    from cee_env.cache import take_rows

    return take_rows(cache, idx)


def calib_folds(cache: LayerCache, k: int, seed: int) -> list[np.ndarray]:
    """Stratified folds of calib (row indices) for cross-fitting the learned methods."""
    from backbones.protocol import fold_ids

    ids = fold_ids(np.asarray(cache.labels), k, seed)
    return [np.flatnonzero(ids == j) for j in range(k)]


DEPLOY_MODES = ("refit", "nested", "mean")


def crossfit_scores(fit, caches: dict[str, LayerCache], folds: list[np.ndarray],
                    first_model: dict | None = None, deploy: str = "refit", seed: int = 0) -> dict[str, np.ndarray]:
    """``fit(train_cache, held_cache, j)`` -> score function (``j`` numbers the model); calib scores out of fold,
    and the scores of the deployed rule elsewhere, so that the rule whose calib figure is chosen is the rule
    deployed (``deploy``):

    - ``nested``: deployed, the mean of the K fold models; a calib row in fold k is scored by the mean of K
      models trained on inner folds of the other folds (none saw the row): the same averaged rule, each of its
      models trained on ((K-1)/K)^2 of calib instead of (K-1)/K. K x (K + 1) models.
    - ``refit``: deployed, one model trained on all of calib; a calib row is scored by the single model that did
      not learn on its fold (a single model, on less data). K + 1 models.
    - ``mean``: deployed, the mean of the K fold models, while calib is scored by single out-of-fold models: the
      calib figure describes another rule than the one deployed. K models.

    ``first_model``, if given, receives the scores of model 0 alone (trained without fold 0): on fold 0's
    calib rows ("calib"), on the calib rows it learned on ("calib_fit") and on every other split; risk
    control picks its knob path on "calib_fit" and calibrates it on fold 0."""
    if deploy not in DEPLOY_MODES:
        raise ValueError(f"deploy must be one of {DEPLOY_MODES}; got {deploy!r}")
    calib = caches["calib"]
    K = len(folds)
    out = {s: np.zeros((c.num_instances, c.num_layers)) for s, c in caches.items()}
    for j, held in enumerate(folds):
        rest = np.setdiff1d(np.arange(calib.num_instances), held)
        score = fit(take(calib, rest), take(calib, held), j)
        single = score(take(calib, held))
        if deploy == "nested":  # the mean of K inner models, none trained on fold j
            sub = take(calib, rest)
            inner = calib_folds(sub, K, seed + 7919 * (j + 1))
            out["calib"][held] = np.mean([
                fit(take(sub, np.setdiff1d(np.arange(len(rest)), h)), take(sub, h), K + j * K + i)(take(calib, held))
                for i, h in enumerate(inner)], axis=0)
        else:
            out["calib"][held] = single
        for s, c in caches.items():
            if s != "calib":
                sc = score(c)
                if deploy != "refit":
                    out[s] += sc / K
                if j == 0 and first_model is not None:
                    first_model[s] = sc
        if j == 0 and first_model is not None:
            first_model["calib"] = single.copy()
            first_model["calib_fit"] = score(take(calib, rest))
    if deploy == "refit":  # one model on every calib row (its calib scores would be in-sample: never read)
        score = fit(calib, calib, K)  # (the held cache only feeds a learner's own evaluation log)
        for s, c in caches.items():
            if s != "calib":
                out[s] = score(c)
    return out


def parse_learner(spec: str) -> tuple[str, str, str]:
    """'ALGO:OBS:REWARD' -> (algo, obs, reward), checked."""
    from cee_env.observations import OBS_MODES
    from cee_env.rewards import REWARDS

    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ALGOS or parts[1] not in OBS_MODES or parts[2] not in REWARDS:
        raise ValueError(f"--learners expects ALGO:OBS:REWARD with ALGO in {ALGOS}, OBS in {OBS_MODES}, "
                         f"REWARD in {REWARDS}; got {spec!r}")
    return parts[0], parts[1], parts[2]


def learner_label(spec: str, paper_rule: bool) -> str:
    algo, obs, reward = parse_learner(spec)
    name = {"reinforce": "ConsistentEE (REINFORCE)", "fqi": "FQI"}.get(algo, algo.upper() + " (SB3)")
    rule = "pi > 0.5, alpha chosen" if paper_rule else "alpha and threshold chosen"
    return f"{name}, {obs} obs, {REWARD_LABEL[reward]} reward, {rule}"


REUSE_KEY = "benchmark_key.json"


def _fit_key(args, train: LayerCache) -> str:
    """sha256 of a learner's settings and of the exact cache rows it learns on: a saved policy with the same
    key is the policy this fit would train (training is seeded), so a rerun can load it instead."""
    import dataclasses
    import hashlib

    h = hashlib.sha256()
    fields = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("quiet", "torch_threads", "run_name")}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    h.update(json.dumps([train.task, train.meta.get("checkpoint"), train.num_layers], default=str).encode())
    for a in (train.labels, train.log_probs, train.states):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _reuse(run_dir: Path, key: str):
    """The policy saved in ``run_dir`` if its benchmark key matches ``key`` and its files check out, else None."""
    from agents.inference.early_exit_model import load_policy
    from backbones.files import IntegrityError, read_json

    try:
        if read_json(run_dir / REUSE_KEY, "").get("key") != key:
            return None
        return load_policy(run_dir, threshold=0.5)[0]
    except (FileNotFoundError, IntegrityError, ValueError, KeyError, OSError):
        return None  # missing, stale or damaged: train again


def repeated_crossfit(make_fit, caches: dict[str, LayerCache], fold_sets: list[list[np.ndarray]],
                      first_model: dict | None = None, deploy: str = "refit", seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`crossfit_scores` once per fold split (``make_fit(r)`` gives split r's fitter), averaged: every calib
    row's score is the mean of its out-of-fold scores, every other split's the mean of the deployed rules.
    ``first_model`` is filled from split 0's model 0 (as :func:`crossfit_scores` does)."""
    outs = [crossfit_scores(make_fit(r), caches, folds, first_model if r == 0 else None, deploy, seed + 1000 * r)
            for r, folds in enumerate(fold_sets)]
    return {s: np.mean([o[s] for o in outs], axis=0) for s in outs[0]}


def _learner_args(task: str, spec: str, alpha: float, cfg: BenchmarkConfig, j: int, repeat: int = 0):
    """The Args of knob path (``spec``, ``alpha``)'s model ``j`` (``j == calib_folds``: the refit, deployed one)
    and the runs/ subfolder its learner writes to."""
    algo, obs, reward = parse_learner(spec)
    rep = f"r{repeat}" if repeat else ""
    name = f"benchmark-{task}-{algo}-{obs}-{reward}-a{alpha:g}-f{j}of{cfg.calib_folds}{rep}-s{cfg.seed}"
    if algo == "reinforce":
        from agents.reinforce import Args

        args = Args(env=_env_id(task), obs=obs, reward=reward, alpha=float(alpha), epochs=cfg.epochs,
                    seed=cfg.seed + j, eval_every=10 ** 9, quiet=True, run_name=name, torch_threads=cfg.threads)
    elif algo == "fqi":
        from agents.fqi import Args

        args = Args(env=_env_id(task), obs=obs, reward=reward, alpha=float(alpha), seed=cfg.seed + j,
                    quiet=True, run_name=name, torch_threads=cfg.threads)
    else:
        from agents.sb3 import Args

        args = Args(algo=algo, env=_env_id(task), obs=obs, reward=reward, alpha=float(alpha), seed=cfg.seed + j,
                    total_timesteps=cfg.sb3_steps, eval_every=0, quiet=True, run_name=name,
                    torch_threads=cfg.threads)
    return args, ("sb3" if algo not in ("reinforce", "fqi") else algo)


def _keyed(args, train: LayerCache, sub: str):
    """(args with the run name keyed by settings and training rows, its run folder, the key)."""
    from backbones.paths import runs_dir

    key = _fit_key(args, train)
    args = replace(args, run_name=f"{args.run_name}-{key[:10]}")  # runs on other training rows get their own folder
    return args, runs_dir() / sub / args.run_name, key


def _policy_fitter(task: str, spec: str, alpha: float, cfg: BenchmarkConfig, repeat: int = 0):
    from backbones.files import write_json

    algo = parse_learner(spec)[0]

    def fit(train: LayerCache, held: LayerCache, j: int):
        caches = {"train": train, "dev": held}
        if algo == "reinforce":
            from agents.reinforce import train as fit_policy
        elif algo == "fqi":
            from agents.fqi import train as fit_policy
        else:
            from agents.sb3 import train as fit_policy
        args, sub = _learner_args(task, spec, alpha, cfg, j, repeat)
        args, run_dir, key = _keyed(args, train, sub)
        policy = _reuse(run_dir, key) if cfg.reuse else None
        if policy is None:
            out = fit_policy(args, caches)
            policy, run_dir = out["policy"], Path(out["run_dir"])
            write_json(run_dir / REUSE_KEY, {"key": key})
        return lambda c: policy.exit_probs(c.states if policy.needs_states else None, c.log_probs)

    return fit


def deployed_run(task: str, method: str, knob: dict, calib: LayerCache, cfg: BenchmarkConfig) -> dict | None:
    """The run folder and exit threshold of a learned method's deployed rule (``--deploy refit``: one policy
    refitted on all of calib), for ``agents.predict --run`` / ``benchmarks.inference_speed``; None when the
    deployed rule is no single saved policy (other deploy modes, repeats, BERxiT) or its folder is missing."""
    spec = method.removesuffix("+paper")
    if cfg.deploy != "refit" or cfg.calib_repeats != 1 or spec == "berxit" or "alpha" not in knob:
        return None
    from backbones.files import stored_path

    args, sub = _learner_args(task, spec, knob["alpha"], cfg, cfg.calib_folds)
    _, run_dir, key = _keyed(args, calib, sub)
    if _reuse(run_dir, key) is None:  # not there, or not the policy this benchmark fitted
        return None
    return {"run": stored_path(run_dir), "threshold": float(knob.get("threshold", 0.5))}


def _lte_fitter(cfg: BenchmarkConfig):
    def fit(train: LayerCache, held: LayerCache, j: int):
        head = train_lte(train, replace(cfg.lte, seed=cfg.seed + j))
        return BerxitExit(head, 0.5).scores

    return fit


def learned_path(task: str, method: str, alpha: float | None, cfg: "BenchmarkConfig", fold_sets: list,
                 caches: dict[str, LayerCache]) -> tuple[dict, dict, float]:
    """One knob path of the learned sweep as a pure function of its arguments (what a Ray worker runs): ``method``
    "berxit" or a learner spec at ``alpha``, cross-fitted over ``fold_sets``; (scores, model 0's scores, seconds)."""
    from agents.runtime import torch_threads

    t0, first = time.time(), {}
    make = (lambda r: _lte_fitter(cfg)) if method == "berxit" else (lambda r: _policy_fitter(task, method, alpha, cfg, r))
    with torch_threads(cfg.threads):
        s = repeated_crossfit(make, caches, fold_sets, first, cfg.deploy, cfg.seed)
    return s, first, time.time() - t0


def sweep_learned(task: str, caches: dict[str, LayerCache], cfg: BenchmarkConfig, log) -> tuple[list[dict], dict]:
    """BERxiT and every learner x alpha, cross-fitted on calib; points of every knob on every split. The knob paths
    (method x alpha) are independent: they run through :func:`agents.parallel.fit_map` (in this process, or on Ray
    with ``--workers`` / ``--ray-address``) and are assembled in the serial order with the same seeds."""
    from agents.parallel import fit_map

    fold_sets = [calib_folds(caches["calib"], cfg.calib_folds, cfg.seed + 1000 * r) for r in range(cfg.calib_repeats)]
    points, timing = [], {}
    families: dict[str, list[dict]] = {}  # method -> per alpha (knob path) the scores of model 0 (risk control)
    paths = [("berxit", None)] + [(spec, alpha) for spec in cfg.learners for alpha in cfg.alphas]
    t0 = time.time()
    done = iter(fit_map(learned_path, [(task, m, a, cfg, fold_sets) for m, a in paths],
                        [f"{task}/{m}" + (f"/a{a:g}" if a is not None else "") for m, a in paths], shared=caches,
                        workers=cfg.workers, address=cfg.ray_address, desc=None if cfg.quiet else f"[{task}] {len(paths)} knob paths"))
    timing["learned_paths"], timing["learned_wall_s"] = len(paths), round(time.time() - t0, 1)
    s, first, secs = next(done)
    families["berxit"] = [first]
    timing["berxit_s"] = round(secs, 1)
    points += score_points(task, "berxit", s, caches, [({"threshold": t}, t) for t in threshold_grid(s["calib"], cfg.grid)])
    for spec in cfg.learners:
        families[spec], secs_spec = [], 0.0
        for alpha in cfg.alphas:
            s, first, secs = next(done)
            families[spec].append({"alpha": alpha, **first})
            secs_spec += secs
            thr = threshold_grid(s["calib"], cfg.grid, fixed=(0.5,))
            points += score_points(task, spec, s, caches, [({"alpha": alpha, "threshold": t}, t) for t in thr])
            points += score_points(task, spec + "+paper", s, caches, [({"alpha": alpha}, 0.5)])
        timing[f"{spec}_s"] = round(secs_spec, 1)  # seconds of fitting, summed over its paths
        calib = caches["calib"]
        ref = score_exits(np.full(calib.num_instances, calib.num_layers - 1), calib, "full").metric
        cal = choose([p for p in points if p["method"] == spec and p["split"] == "calib"], ref, cfg.max_drop)
        log(f"  [{task}] {spec}: {len(cfg.alphas)} alphas x {cfg.calib_folds} folds x {cfg.calib_repeats} splits, "
            f"fits {timing[f'{spec}_s']:.0f} s; calib <=1 pt: {_describe(cal)}")
    return points, timing, families, fold_sets[0][0]


def _describe(p: dict | None) -> str:
    if p is None:
        return "-"
    knob = ", ".join(f"{k}={v:.4g}" for k, v in p["knob"].items())
    return f"{100 * p['metric']:.1f} at {100 * p['saved']:.1f}% saved ({knob})"


def _env_id(task: str) -> str:
    import gymnasium as gym

    import cee_env

    try:
        return cee_env.register_task_env(task) if task.lower() != "synthetic" else "cee/Synthetic-v0"
    except gym.error.Error:
        return "cee/Synthetic-v0"


# --------------------------------------------------------------------------- choosing on calib
def choose(points: list[dict], reference: float, max_drop: float) -> dict | None:
    """The point with the most saved layers among those scoring >= reference - max_drop (ties: higher
    score, then the earlier point); None when none qualifies."""
    ok = [(i, p) for i, p in enumerate(points) if p["metric"] >= reference - max_drop - 1e-9]
    if not ok:
        return None
    return max(ok, key=lambda ip: (round(ip[1]["saved"], 12), round(ip[1]["metric"], 12), -ip[0]))[1]


def _full(points: list[dict], task: str, split: str) -> float:
    return next(p["metric"] for p in points if p["task"] == task and p["method"] == "full" and p["split"] == split)


def _key(p: dict) -> tuple:
    return (p["method"], json.dumps(p["knob"], sort_keys=True), p["split"])


def operating_points(points: list[dict], task: str, max_drop: float) -> dict:
    """Per method, the knob chosen on calib for 'no_loss' and 'max1', with its point on every split."""
    mine = [p for p in points if p["task"] == task]
    by = {_key(p): p for p in mine}
    splits = sorted({p["split"] for p in mine}, key=lambda s: ("calib", "dev", "test").index(s) if s in
                    ("calib", "dev", "test") else 9)
    ref = _full(mine, task, "calib")
    out: dict = {"reference_calib": ref, "splits": splits}
    for fixed in ("full", "oracle"):
        out[fixed] = {s: by.get((fixed, "{}", s)) for s in splits}
    for method in dict.fromkeys(p["method"] for p in mine if p["method"] not in ("full", "oracle")):
        cal = [p for p in mine if p["method"] == method and p["split"] == "calib"]
        out[method] = {}
        for name, drop in (("no_loss", 0.0), ("max1", max_drop)):
            c = choose(cal, ref, drop)
            out[method][name] = None if c is None else {
                "knob": c["knob"], **{s: by.get((method, json.dumps(c["knob"], sort_keys=True), s)) for s in splits}}
    return out


def gap_ci(learned: dict, heuristic: dict, level: float = 0.95, seed: int = 0) -> list[float] | str | None:
    """Bootstrap confidence interval (scipy.stats.bootstrap, BCa, 2,000 resamples) of the saved-layers gap
    learned - heuristic on one split, paired over its instances: the uncertainty of that split's sampling,
    not of the calib choices. ``"exact"`` when every instance has the same difference (e.g. both rules
    exit every instance at one layer: no sampling noise to bound); None without per-instance exits."""
    from scipy.stats import bootstrap

    el, eh = learned.get("_exits"), heuristic.get("_exits")
    if el is None or eh is None or len(el) != len(eh) or len(el) < 2:
        return None
    d = (eh.astype(np.float64) - el.astype(np.float64)) / learned["num_layers"]
    if np.ptp(d) == 0:  # every instance the same difference: a bootstrap has nothing to resample
        return "exact"
    ci = bootstrap((d,), np.mean, confidence_level=level, n_resamples=2000, method="BCa",
                   random_state=np.random.default_rng(seed)).confidence_interval
    return [float(ci.low), float(ci.high)]


def headline(ops: dict, learned: list[str]) -> dict:
    """The learned method and the heuristic best on calib at '<= 1 pt', with their test points."""
    def best(methods):
        cand = [(m, ops[m]["max1"]) for m in methods if m in ops and ops[m]["max1"] is not None]
        if not cand:
            return None
        m, op = max(cand, key=lambda mo: (round(mo[1]["calib"]["saved"], 12), round(mo[1]["calib"]["metric"], 12)))
        return {"method": m, **op}

    out = {"learned": best(learned), "heuristic": best(list(HEURISTICS))}
    if out["learned"] and out["heuristic"]:
        out["gap_ci"] = {s: gap_ci(out["learned"][s], out["heuristic"][s]) for s in ops["splits"]
                         if s != "calib" and out["learned"].get(s) and out["heuristic"].get(s)}
    return out


# --------------------------------------------------------------------------- tables
def method_label(method: str) -> str:
    if method in HEURISTICS:
        return HEURISTICS[method]
    if method == "berxit":
        return "BERxiT (learned exit head)"
    paper = method.endswith("+paper")
    return learner_label(method.removesuffix("+paper"), paper)


def score_cell(p: dict | None, full: dict | None) -> str:
    """A table cell: the point's score, its change vs the full-depth point ``full``, and its saved layers."""
    if p is None:
        return "-"
    d = 100 * (p["metric"] - full["metric"]) if full else 0.0
    return f"{100 * p['metric']:.1f} ({d:+.1f}) {100 * p['saved']:.0f}%"


def markdown_table(ops_by_task: dict, tasks: list[str], split: str, op: str) -> str:
    """Rows = methods, columns = tasks: score (change vs full depth) and saved layers at the calib-chosen knob."""
    tasks = [t for t in tasks if split in ops_by_task[t]["splits"]]
    if not tasks:
        return ""
    metric = {t: (ops_by_task[t]["full"][split] or {}).get("metric_name", "") for t in tasks}
    lines = ["| method | " + " | ".join(f"{t} {metric[t]}" for t in tasks) + " | avg saved |",
             "|---" * (len(tasks) + 2) + "|"]
    full = {t: ops_by_task[t]["full"][split] for t in tasks}
    lines.append("| Backbone, full depth | " + " | ".join(score_cell(full[t], full[t]) for t in tasks) + " | 0% |")
    methods = list(dict.fromkeys(m for t in tasks for m in ops_by_task[t] if isinstance(ops_by_task[t][m], dict)
                                 and "max1" in ops_by_task[t][m]))
    for m in methods:
        cells = [(ops_by_task[t].get(m) or {}).get(op) for t in tasks]
        pts = [None if c is None else c.get(split) for c in cells]
        have = [p for p in pts if p is not None]
        avg = f"{100 * np.mean([p['saved'] for p in have]):.0f}%" if len(have) == len(pts) else "-"
        lines.append(f"| {method_label(m)} | " + " | ".join(score_cell(p, full[t]) for p, t in zip(pts, tasks)) + f" | {avg} |")
    lines.append("| Oracle (first correct layer) | " + " | ".join(
        score_cell(ops_by_task[t]["oracle"][split], full[t]) for t in tasks) + " | |")
    return "\n".join(lines)


def headline_table(ops_by_task: dict, heads: dict, tasks: list[str]) -> str:
    lines = ["| task | test split | best learned on calib | test score (change) | saved | best heuristic on calib | "
             "test score (change) | saved | saved gap [95% CI] |", "|---" * 9 + "|"]
    gaps: dict[str, list[float]] = defaultdict(list)
    for t in tasks:
        h = heads[t]
        for split in ops_by_task[t]["splits"]:
            if split == "calib":
                continue
            full = ops_by_task[t]["full"][split]
            lp = None if h["learned"] is None else h["learned"].get(split)
            hp = None if h["heuristic"] is None else h["heuristic"].get(split)
            gap = "-" if lp is None or hp is None else f"{100 * (lp['saved'] - hp['saved']):+.1f}"
            ci = (h.get("gap_ci") or {}).get(split)
            if ci == "exact" and gap != "-":
                gap += " (exact: the same on every instance)"
            elif ci is not None and gap != "-":
                gap += f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
            if gap != "-":
                gaps[split].append(100 * (lp["saved"] - hp["saved"]))
            lines.append(f"| {t} | {split} | {method_label(h['learned']['method']) if h['learned'] else '-'} | "
                         f"{score_cell(lp, full).rsplit(' ', 1)[0] if lp else '-'} | {100 * lp['saved']:.1f}% | "
                         if lp else f"| {t} | {split} | - | - | - | ")
            lines[-1] += (f"{method_label(h['heuristic']['method'])} | {score_cell(hp, full).rsplit(' ', 1)[0]} | "
                          f"{100 * hp['saved']:.1f}% | {gap} |" if hp else "- | - | - | - |")
    for split, g in gaps.items():
        lines.append(f"| average | {split} | | | | | | | {np.mean(g):+.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def plot_curves(points: list[dict], ops: dict, task: str, path: Path) -> None:
    """Metric vs saved layers per split: every method's upper frontier, the calib-chosen '<= 1 pt' points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backbones.files import write_with

    splits = ops["splits"]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits) + 3, 5), squeeze=False)
    methods = [m for m in ops if isinstance(ops[m], dict) and "max1" in ops[m]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, split in zip(axes[0], splits):
        full = ops["full"][split]
        ax.axhline(100 * full["metric"], color="k", lw=0.8, label="full depth")
        ax.axhspan(100 * full["metric"] - 1, 100 * full["metric"], color="k", alpha=0.06)
        for i, m in enumerate(methods):
            pts = [p for p in points if p["task"] == task and p["method"] == m and p["split"] == split]
            front, best = [], -np.inf
            for p in sorted(pts, key=lambda p: (-p["saved"], -p["metric"])):
                if p["metric"] > best:
                    front.append(p)
                    best = p["metric"]
            front = front[::-1]
            c = colors[i % len(colors)]
            ax.plot([100 * p["saved"] for p in front], [100 * p["metric"] for p in front], color=c, lw=1,
                    label=method_label(m)[:60])
            chosen = ops[m]["max1"]
            if chosen and chosen.get(split):
                ax.plot([100 * chosen[split]["saved"]], [100 * chosen[split]["metric"]], "o", color=c, ms=6)
        orc = ops["oracle"][split]
        ax.plot([100 * orc["saved"]], [100 * orc["metric"]], "k*", ms=10, label="oracle")
        ax.set_ylim(100 * full["metric"] - 12, max(100 * orc["metric"], 100 * full["metric"]) + 2)
        ax.set_xlim(-2, 100)
        ax.set_xlabel("saved layers (%)")
        ax.set_ylabel(f"{full['metric_name']} (%)")
        ax.set_title(f"{task} {split} (n={full['n']}); dots: '<= 1 pt' knobs chosen on calib", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def plot_ablation(points: list[dict], tasks: list[str], path: Path) -> None:
    """The paper's Figure 4: Eq 3 vs Eq 4 with the paper's rule (state obs, pi > 0.5), metric vs speed-up, on dev."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backbones.files import write_with

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sp = [p for p in points if p["task"] == task and p["split"] == "dev"]
        for reward, color in (("vanilla", "tab:orange"), ("hardness", "tab:red")):
            pts = sorted((p for p in sp if p["method"] == f"reinforce:state:{reward}+paper"), key=lambda p: p["avg_exit"])
            if pts:
                ax.plot([p["num_layers"] / p["avg_exit"] for p in pts], [100 * p["metric"] for p in pts], "o-",
                        color=color, label=f"{REWARD_LABEL[reward]}")
        full = next((p for p in sp if p["method"] == "full"), None)
        if full:
            ax.axhline(100 * full["metric"], color="k", lw=0.8, ls="--", label="full depth")
        ax.set_xlabel("speed-up (L / avg exit layer)")
        ax.set_title(f"{task} dev: reward ablation", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------- risk control
def parse_setting(setting: str) -> tuple[str, float, float]:
    from agents.calibrate import RISKS

    parts = setting.split(":")
    try:
        risk, eps, delta = parts[0], float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise ValueError(f"--ltt expects RISK:EPSILON:DELTA; got {setting!r}") from None
    if risk not in RISKS or not (0 < eps < 1 and 0 < delta < 1) or len(parts) != 3:
        raise ValueError(f"--ltt expects RISK:EPSILON:DELTA with RISK in {RISKS} and EPSILON, DELTA in (0, 1); "
                         f"got {setting!r}")
    return risk, eps, delta


def setting_label(setting: str) -> str:
    risk, eps, delta = parse_setting(setting)
    return f"{risk.replace('_', ' ')} <= {eps:g} with probability >= {1 - delta:g}"


def _concat(a: LayerCache, b: LayerCache) -> LayerCache:
    return LayerCache(states=np.concatenate([a.states, b.states]), log_probs=np.concatenate([a.log_probs, b.log_probs]),
                      labels=np.concatenate([a.labels, b.labels]), task=a.task, split="pool",
                      label_names=a.label_names, metric=a.metric)


def choose_path(family: list[dict], fit: LayerCache, risk: str, epsilon: float, delta: float) -> int:
    """The knob path (alpha) of a learned method for risk control, read on the rows its model learned on
    (``"calib_fit"`` scores): the one whose Learn-then-Test there saves the most layers; the first (smallest
    alpha) when none passes."""
    from agents.calibrate import conservative_grid, learn_then_test

    best, best_saved = 0, -1.0
    for j, f in enumerate(family):
        c = learn_then_test([f["calib_fit"]], [conservative_grid(f["calib_fit"])], fit, risk, epsilon, delta)
        if c.threshold is not None and c.saved > best_saved + 1e-12:
            best, best_saved = j, c.saved
    return best


def risk_control(caches: dict[str, LayerCache], families: dict[str, list[dict]], fold0: np.ndarray,
                 cfg: BenchmarkConfig) -> dict:
    """Per setting and method: the Learn-then-Test knob on calib, its test risk / score / saved layers, and
    the re-draw check of the guarantee. Heuristics calibrate on all of calib. A learned method deploys its
    model 0 (which never saw fold 0): the alpha and the threshold grid are chosen on the calib rows model 0
    learned on (the alpha whose Learn-then-Test there saves the most), then that one path is calibrated on
    fold 0, so delta is not split across alphas and fold 0 is read by the test alone."""
    from agents.calibrate import conservative_grid, learn_then_test, resplit_validation, risk_errors, rule_scores

    calib = caches["calib"]
    methods: dict[str, tuple[LayerCache, list[dict]]] = {}
    for rule, name in (("static", "static"), ("entropy", "deebert"), ("maxprob", "maxprob"), ("patience", "pabee")):
        fam = {split: rule_scores(rule, c)[0] for split, c in caches.items()}
        methods[name] = (calib, [fam], rule)
    cal0 = take(calib, fold0)
    cal_fit = take(calib, np.setdiff1d(np.arange(calib.num_instances), fold0))
    for name, fam in families.items():
        methods[name] = (cal0, fam, None)
    out: dict = {}
    for setting in cfg.ltt:
        risk, eps, delta = parse_setting(setting)
        res = out[setting] = {}
        for name, (cal, fam, rule) in methods.items():
            learned = "calib_fit" in fam[0]
            if learned:  # one path and its grid, chosen where model 0 learned
                fam = [fam[choose_path(fam, cal_fit, risk, eps, delta)]]
                grids = [conservative_grid(fam[0]["calib_fit"])]
            cal_scores = [f["calib"] for f in fam]
            if not learned:  # a grid fixed by the rule's score range, before its calib scores are seen
                grids = [rule_scores(rule, cal)[1]]
            c = learn_then_test(cal_scores, grids, cal, risk, eps, delta)
            row = {"calibration": c.to_dict(), "alpha": fam[0].get("alpha")}
            for split, cache in caches.items():
                if split == "calib":
                    continue
                e = (np.full(cache.num_instances, cache.num_layers - 1) if c.threshold is None
                     else exits_at(fam[c.path][split], c.threshold))
                r = score_exits(e, cache, name)
                row[split] = {"risk": float(risk_errors(e, cache, risk).mean()), "metric": r.metric,
                              "saved": r.saved_layers, "n": r.n}
            if cfg.ltt_resplits:
                pool = _concat(cal, caches["dev"])
                scores = [np.concatenate([f["calib"], f["dev"]]) for f in fam]
                row["validation"] = resplit_validation(scores, pool, cal.num_instances, risk, eps, delta,
                                                       cfg.ltt_resplits, cfg.seed, grids=grids)
            res[name] = row
    return out


def risk_table(risk: dict, tasks: list[str], setting: str, reps: int) -> str:
    lines = ["| method | " + " | ".join(f"{t}: dev risk, saved" + ("; re-draws: violations, population saved" if reps else "")
                                       for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    methods = list(dict.fromkeys(m for t in tasks for m in risk[t][setting]))
    for m in methods:
        cells = []
        for t in tasks:
            row = risk[t][setting].get(m)
            if row is None:
                cells.append("-")
                continue
            if row["calibration"]["threshold"] is None:
                cells.append(f"none passed (calib n={row['calibration']['n']}, needs >= {row['calibration']['min_n']})")
                continue
            d = row["dev"]
            v = row.get("validation")
            cells.append(f"{100 * d['risk']:.1f}%, {100 * d['saved']:.0f}%"
                         + (f"; {100 * v['violation_frequency']:.1f}%, {100 * v['mean_population_saved']:.0f}%" if v else ""))
        lines.append(f"| {method_label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver
def run_benchmark(caches_by_task: dict[str, dict[str, LayerCache]], cfg: BenchmarkConfig | None = None,
                  timings: dict[str, dict] | None = None) -> dict:
    """The comparison on given caches ({task: {"calib", "dev"[, "test"]}}); writes and returns the results."""
    from backbones.files import stored_path, write_json, write_text
    from backbones.paths import model_suffix, runs_dir

    cfg = cfg or BenchmarkConfig()
    for spec in cfg.learners:
        parse_learner(spec)
    out_dir = Path(cfg.out) if cfg.out else runs_dir() / ("benchmark" + model_suffix(cfg.model))
    log = (lambda m: None) if cfg.quiet else (lambda m: print(m, flush=True))
    timings = {t: dict(v) for t, v in (timings or {}).items()}
    points: list[dict] = []
    risk: dict[str, dict] = {}
    tasks = list(caches_by_task)
    for task, caches in caches_by_task.items():
        for need in ("calib", "dev"):
            if need not in caches:
                raise ValueError(f"{task}: the benchmark needs a {need!r} cache; got {sorted(caches)}")
        for s, c in caches.items():
            if not c.has_labels:
                raise ValueError(f"{task}/{s}: the cache has no labels (a test file needs its labels)")
        tm = timings.setdefault(task, {})
        t0 = time.time()
        log(f"[{task}] heuristics on {', '.join(caches)} (L={caches['calib'].num_layers}, "
            + ", ".join(f"{s} n={c.num_instances}" for s, c in caches.items()) + ")")
        points += sweep_heuristics(task, caches, cfg)
        tm["heuristics_s"] = round(time.time() - t0, 1)
        learned_points, tl, families, cal_rows = sweep_learned(task, caches, cfg, log)
        points += learned_points
        tm.update(tl)
        t0 = time.time()
        risk[task] = risk_control(caches, families, cal_rows, cfg)
        tm["risk_control_s"] = round(time.time() - t0, 1)
    ops = {t: operating_points(points, t, cfg.max_drop) for t in tasks}
    learned = ["berxit"] + [m for s in cfg.learners for m in (s, s + "+paper")]
    rl_learned = [m for s in cfg.learners for m in (s, s + "+paper")]
    heads = {t: headline(ops[t], rl_learned) for t in tasks}
    for t in tasks:
        if (best := heads[t]["learned"]) is not None:
            best["deployed"] = deployed_run(t, best["method"], best["knob"], caches_by_task[t]["calib"], cfg)
    for p in points:  # per-instance exits served the confidence intervals; not written
        p.pop("_exits", None)
    md = [f"# Learned exits vs confidence heuristics ({', '.join(tasks)})", "",
          "Every knob (threshold, patience, layer, alpha, policy threshold) is chosen on calib; test splits are "
          "reported once. Cells: score (change vs full depth on that split) and saved layers. "
          f"'<= 1 pt' allows {100 * cfg.max_drop:g} point below full depth on calib.", "",
          "## Headline: best learned policy vs best heuristic, '<= 1 pt' chosen on calib", "",
          headline_table(ops, heads, tasks), "",
          ("Saved gap: learned minus heuristic saved layers on the test split, in brackets its 95% bootstrap "
           "interval paired over the split's instances (the split's sampling noise; the calib choices are fixed); "
           "'exact' when both rules' exits differ by the same amount on every instance (nothing to resample)."), ""]
    splits = list(dict.fromkeys(s for t in tasks for s in ops[t]["splits"]))
    for split in [s for s in splits if s != "calib"] + ["calib"]:
        for op, tag in (("max1", "<= 1 pt"), ("no_loss", "no loss")):
            tbl = markdown_table(ops, tasks, split, op)
            if tbl:
                md += [f"## {SPLIT_NOTE.get(split, split)}, operating point '{tag}'", "", tbl, ""]
    for setting in cfg.ltt:
        md += [f"## Risk control: {setting_label(setting)}, chosen by Learn-then-Test on calib", "",
               risk_table(risk, tasks, setting, cfg.ltt_resplits), ""]
    markdown = "\n".join(md)
    files = {"table": out_dir / "table.md", "results": out_dir / "results.json"}
    write_text(files["table"], markdown)
    if cfg.plots:
        for t in tasks:
            files[f"curves_{t}"] = out_dir / f"{t}_curves.png"
            plot_curves(points, ops[t], t, files[f"curves_{t}"])
        if any(s.startswith("reinforce:state:") for s in cfg.learners):
            files["ablation"] = out_dir / "fig4_reward_ablation.png"
            plot_ablation(points, tasks, files["ablation"])
    ckpts = {t: stored_path(c["calib"].meta["checkpoint"]) for t, c in caches_by_task.items()
             if c["calib"].meta.get("checkpoint")}  # the backbone each task ran on (stage-1 curves: depth_table)
    result = {"config": asdict(cfg), "timing": timings, "operating_points": ops, "headline": heads, "risk_control": risk,
              "checkpoints": ckpts,
              "learned_methods": learned, "points": points, "files": {k: str(v) for k, v in files.items()}}
    write_json(files["results"], result)
    result["markdown"] = markdown
    return result


def _pairs(items: tuple[str, ...], flag: str, tasks: tuple[str, ...]) -> dict[str, str]:
    from backbones.tasks import get_task

    out = {}
    names = {get_task(t).name if t.lower() != "synthetic" else t for t in tasks}
    for it in items:
        if "=" not in it:
            raise ValueError(f"{flag} expects TASK=PATH; got {it!r}")
        k, v = (x.strip() for x in it.split("=", 1))
        k = get_task(k).name if k.lower() != "synthetic" else k
        if k not in names:
            raise ValueError(f"{flag} names task {k!r}, which is not in --tasks {', '.join(tasks)}")
        out[k] = v
    return out


def load_caches(task: str, cfg: BenchmarkConfig, test_file: str | None, checkpoint: str | None) -> dict[str, LayerCache]:
    """calib, dev and (with a test file) test caches of a task under the deployed checkpoint."""
    from cee_env.cache import deployed_checkpoint, get_cache

    if task.lower() == "synthetic":
        from cee_env.synthetic import make_synthetic_cache

        return {s: make_synthetic_cache(split=s, seed=cfg.seed) for s in ("calib", "dev")}
    ckpt = checkpoint or deployed_checkpoint(task, cfg.protocol, cfg.data_dir, cfg.model)
    kw = dict(task=task, checkpoint=ckpt, data_dir=cfg.data_dir)
    out = {"calib": get_cache(split="calib", **kw), "dev": get_cache(split="dev", **kw)}
    if test_file:
        out["test"] = get_cache(split="test", test_file=test_file, **kw)
    return out


def check(cfg: BenchmarkConfig) -> None:
    from agents.parallel import check_workers
    from backbones.cli import UserError

    if not cfg.tasks:
        raise UserError("--tasks is empty")
    if cfg.calib_folds < 2:
        raise UserError(f"--calib-folds must be >= 2; got {cfg.calib_folds}")
    if cfg.deploy not in DEPLOY_MODES:
        raise UserError(f"--deploy must be one of {', '.join(DEPLOY_MODES)}; got {cfg.deploy!r}")
    if cfg.calib_repeats < 1:
        raise UserError(f"--calib-repeats must be >= 1; got {cfg.calib_repeats}")
    if not (0.0 <= cfg.max_drop < 1.0):
        raise UserError(f"--max-drop must be in [0, 1); got {cfg.max_drop}")
    if any(not np.isfinite(a) or a < 0 for a in cfg.alphas):
        raise UserError(f"--alphas must be finite and >= 0; got {cfg.alphas}")
    if cfg.epochs < 1 or cfg.grid < 2 or cfg.threads < 1:
        raise UserError("--epochs and --threads must be >= 1, --grid >= 2")
    for s in cfg.learners:
        parse_learner(s)
    for s in cfg.ltt:
        parse_setting(s)
    if cfg.ltt_resplits < 0:
        raise UserError(f"--ltt-resplits must be >= 0; got {cfg.ltt_resplits}")
    check_workers(cfg.workers, cfg.ray_address)


def check_paths(cfg: BenchmarkConfig, tests: dict[str, str], ckpts: dict[str, str]) -> None:
    """Every path flag checked before any backbone or cache is built: test files exist and read as their
    task's format, checkpoints are folders, the data directory exists, the output folder can be written."""
    import os

    from backbones.cli import UserError
    from backbones.tasks import load_split

    if cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().is_dir():
        raise UserError(f"--data-dir {cfg.data_dir}: no such directory")
    for task, path in tests.items():
        if not Path(path).expanduser().is_file():
            raise UserError(f"--test-file {task}={path}: no such file")
        if task.lower() != "synthetic":
            load_split(task, "test", path=path)  # a malformed file fails now, not after the backbone is built
    for task, path in ckpts.items():
        if not Path(path).expanduser().is_dir():
            raise UserError(f"--checkpoint {task}={path}: no such checkpoint folder")
    if cfg.out is not None:
        out = Path(cfg.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {cfg.out}: exists and is not a folder")
        base = next(p for p in (out, *out.parents) if p.exists())
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            raise UserError(f"--out {cfg.out}: {base} is not a writable folder")


def main(argv: list[str] | None = None) -> dict:
    from backbones.cli import parse, user_errors

    return user_errors(_main)(parse(BenchmarkConfig, argv, __doc__))


def _main(cfg: BenchmarkConfig) -> dict:
    from agents.runtime import torch_threads

    check(cfg)
    tests, ckpts = _pairs(cfg.test_file, "--test-file", cfg.tasks), _pairs(cfg.checkpoint, "--checkpoint", cfg.tasks)
    check_paths(cfg, tests, ckpts)
    t_all = time.time()
    caches_by_task, timings = {}, {}
    for task in cfg.tasks:
        t0 = time.time()
        print(f"[{task}] loading (or building) the backbone and the layer caches ...", flush=True)
        name = task if task.lower() == "synthetic" else __import__("backbones.tasks", fromlist=["x"]).get_task(task).name
        caches_by_task[name] = load_caches(name, cfg, tests.get(name), ckpts.get(name))
        timings[name] = {"caches_s": round(time.time() - t0, 1)}
    with torch_threads(cfg.threads):  # the caches above were built with every core
        res = run_benchmark(caches_by_task, cfg, timings)
    print("\n" + res["markdown"])
    print("timing (s):")
    for t, tm in res["timing"].items():
        print(f"  {t}: " + ", ".join(f"{k} {v}" for k, v in tm.items()))
    print(f"  total {time.time() - t_all:.0f} s")
    print("\nwritten: " + ", ".join(res["files"].values()))
    return res


if __name__ == "__main__":
    main()
