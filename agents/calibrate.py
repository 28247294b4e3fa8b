"""Exits with a guarantee: choose an exit rule's knob by Learn-then-Test (risk control).

    python -m agents.calibrate --run runs/reinforce/<run> --risk consistency --epsilon 0.02 --delta 0.1
    python -m agents.calibrate --task MCID --rule maxprob --risk accuracy_gap --epsilon 0.01 --delta 0.1

With probability at least 1 - delta over the draw of the calibration set, the chosen
rule's risk on new data from the same distribution is at most epsilon, where the risk is

- ``consistency``: P(early-exit prediction != full-depth prediction), or
- ``accuracy_gap``: P(full depth right and early exit wrong).

Procedure (Learn-then-Test, Angelopoulos et al. 2021, as CALM uses it): the knob's values
are ordered from the most conservative (never exit early) to the most aggressive; for each
value, the exact binomial p-value of the null "risk > epsilon" given k errors on n
calibration instances is P(Binom(n, epsilon) <= k) (``scipy.stats.binom``); fixed-sequence
testing rejects in order and stops at the first value not rejected at level delta; the last
rejected value is deployed. Several knob paths (e.g. one per policy alpha) share delta by
Bonferroni, and the most saving of the values that passed is kept.

The calibration rows must be independent of the rule: heuristics calibrate on the whole
calib split; a learned policy must not have learned on them, so train it on one half of
calib (``python -m agents.reinforce --train-split calib-a``) and it is calibrated on the
other (``calib-b``). The choice is saved in the run folder (``calibration.json``), and
``agents.predict`` / ``EarlyExitClassifier.from_run`` use it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binom

from backbones.cli import UserError, parse, user_errors
from cee_env.cache import LayerCache

RISKS = ("consistency", "accuracy_gap")
RULES = ("policy", "maxprob", "entropy", "patience", "static")
CALIBRATION = "calibration.json"


# --------------------------------------------------------------------------- the statistics
def binom_pvalue(errors: int, n: int, epsilon: float) -> float:
    """p-value of H0: risk > epsilon after ``errors`` errors in ``n`` draws: P(Binom(n, epsilon) <= errors)."""
    if n <= 0:
        return 1.0
    return float(binom.cdf(int(errors), int(n), float(epsilon)))


def fixed_sequence(pvalues: list[float], delta: float) -> int:
    """Index of the last hypothesis rejected when testing in order at level ``delta``, stopping at the
    first non-rejection; -1 when the first is not rejected."""
    last = -1
    for i, p in enumerate(pvalues):
        if p > delta:
            break
        last = i
    return last


def min_calibration_size(epsilon: float, delta: float) -> int:
    """The fewest calibration instances with which any value can pass: zero errors give
    p = (1 - epsilon)^n, which must be <= delta."""
    return int(math.ceil(math.log(delta) / math.log1p(-epsilon)))


def risk_errors(exits: np.ndarray, cache: LayerCache, risk: str) -> np.ndarray:
    """bool [N]: does exiting at these 0-based layers make an error of this risk on each instance?"""
    n = cache.num_instances
    preds = cache.preds
    at = preds[np.arange(n), exits]
    if risk == "consistency":
        return at != preds[:, -1]
    if risk == "accuracy_gap":
        y = np.asarray(cache.labels)
        return (preds[:, -1] == y) & (at != y)
    raise ValueError(f"unknown risk {risk!r}; expected one of {RISKS}")


def exits_for_grid(score: np.ndarray, grid: list[float]) -> np.ndarray:
    """0-based exit layers [K, N] for every threshold of ``grid`` at once: the first layer whose score is
    above the threshold is the first whose running maximum is (the last layer otherwise)."""
    run = np.maximum.accumulate(np.asarray(score, dtype=np.float64)[:, :-1], axis=1)  # [N, L-1]
    t = np.asarray(grid, dtype=np.float64)[:, None, None]
    return (run[None] <= t).sum(2)


def exits_at(score: np.ndarray, threshold: float) -> np.ndarray:
    """0-based exit layer: the first layer whose score is above ``threshold`` (the last layer otherwise)."""
    m = np.asarray(score) > threshold
    m[:, -1] = True
    return m.argmax(1)


@dataclass
class Calibration:
    """A Learn-then-Test choice (``threshold`` None: no value passed)."""

    threshold: float | None
    path: int | None  # which knob path it came from (e.g. the index of an alpha)
    risk: str
    epsilon: float
    delta: float
    n: int
    errors: int | None  # on the calibration set, at the chosen value
    empirical_risk: float | None
    pvalue: float | None
    saved: float | None  # saved layers on the calibration set at the chosen value
    tested: int  # knob values tested, over all paths
    min_n: int  # calibration instances needed for any value to pass

    def to_dict(self) -> dict:
        return asdict(self)


def learn_then_test(scores: list[np.ndarray], grids: list[list[float]], cache: LayerCache, risk: str,
                    epsilon: float, delta: float) -> Calibration:
    """Calibrate score-threshold rules on ``cache``: path j exits at the first layer with ``scores[j] > t``,
    its grid ``grids[j]`` ordered from conservative to aggressive. Each path is tested by fixed sequence
    at level delta / len(paths); of the values that pass, the one saving the most calibration layers is kept."""
    if not (0 < epsilon < 1 and 0 < delta < 1):
        raise UserError(f"--epsilon and --delta must be in (0, 1); got {epsilon}, {delta}")
    n, L = cache.num_instances, cache.num_layers
    level = delta / len(scores)
    err_at = np.stack([risk_errors(np.full(n, l), cache, risk) for l in range(L)], 1)  # [N, L]: error if exit at l
    best, tested = None, 0
    for j, (s, grid) in enumerate(zip(scores, grids)):
        e = exits_for_grid(s, grid)  # [K, N], all values at once
        k = err_at[np.arange(n)[None, :], e].sum(1)
        pv = binom.cdf(k, n, epsilon)
        i = fixed_sequence(pv.tolist(), level)
        tested += min(len(grid), i + 2)  # fixed sequence looks at the values up to the first non-rejection
        if i >= 0:
            saved = 1.0 - (e[i].mean() + 1) / L
            if best is None or saved > best[3] + 1e-12:
                best = (j, grid[i], int(k[i]), saved, float(pv[i]))
    m = min_calibration_size(epsilon, level)
    if best is None:
        return Calibration(None, None, risk, epsilon, delta, n, None, None, None, None, tested, m)
    j, t, k, saved, p = best
    return Calibration(float(t), j, risk, epsilon, delta, n, k, k / n, p, float(saved), tested, m)


def conservative_grid(calib_score: np.ndarray, n: int = 200) -> list[float]:
    """Thresholds from the most conservative down: +inf (never exit early), then the calibration
    scores' quantiles at layers 1..L-1 from the top down."""
    v = np.asarray(calib_score[:, :-1], dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    qs = np.unique(np.quantile(v, np.linspace(0, 1, n))) if v.size else np.array([])
    return [float("inf")] + [float(t) for t in qs[::-1]]


def fixed_grid(lo: float, hi: float, n: int = 200) -> list[float]:
    """Thresholds for a score in [lo, hi], fixed before any calibration score is seen (fixed-sequence
    testing needs its order set in advance): +inf (never exit early), then ``n`` values from ``hi`` down
    to ``lo``, spaced quadratically so they are densest near ``hi``, where confident scores bunch."""
    u = np.linspace(0.0, 1.0, n)
    return [float("inf")] + [float(t) for t in hi - (hi - lo) * u ** 2]


# --------------------------------------------------------------------------- rules as scores
def rule_scores(rule: str, cache: LayerCache, policy=None) -> tuple[np.ndarray, list[float]]:
    """The score matrix [N, L] of a rule (exit where score > knob) on this cache and its knob grid,
    conservative first. The grid depends only on the score's range (:func:`fixed_grid`: exit probability
    in [0, 1], max probability in [1/C, 1], minus entropy in [-log C, 0]), never on the scores themselves;
    ``patience`` and ``static`` have their natural integer grids."""
    from agents.policies.heuristics import max_prob, patience_counters, prediction_entropy

    L, C = cache.num_layers, cache.num_classes
    if rule == "policy":
        s = policy.exit_probs(cache.states if policy.needs_states else None, cache.log_probs)
        return s, fixed_grid(0.0, 1.0)
    if rule == "maxprob":
        return max_prob(cache.log_probs), fixed_grid(1.0 / C, 1.0)
    if rule == "entropy":
        return -prediction_entropy(cache.log_probs), fixed_grid(-math.log(C), 0.0)
    if rule == "patience":
        return patience_counters(cache.preds).astype(float), [float("inf")] + [p - 0.5 for p in range(L - 1, 0, -1)]
    if rule == "static":
        s = np.broadcast_to(np.arange(L, dtype=float), (cache.num_instances, L)).copy()
        return s, [float("inf")] + [k - 1.5 for k in range(L, 1, -1)]  # exit at layer k: score l = k-1 > k-1.5
    raise UserError(f"unknown rule {rule!r}; expected one of {RULES}")


def knob_value(rule: str, threshold: float) -> str:
    """The rule's own knob for ``agents.predict --rule`` (entropy thresholds are negated scores)."""
    if rule == "entropy":
        return f"entropy:{-threshold:.6g}"
    if rule == "patience":
        return f"patience:{int(round(threshold + 0.5))}"
    if rule == "static":
        return f"static-{int(round(threshold + 1.5))}"
    return f"{rule}:{threshold:.6g}"


def check_unseen(run, learned: dict, learned_cache: LayerCache, cal_cache: LayerCache) -> None:
    """Refuse to calibrate a policy on rows it learned on: ``learned_cache`` must still hold the rows the policy
    recorded (``learned["rows_sha256"]``), and none of them may be among the calibration rows."""
    from cee_env.cache import row_ids, rows_sha256

    if rows_sha256(learned_cache) != learned["rows_sha256"]:
        raise UserError(f"the {learned['split']} rows of {learned_cache.task} are no longer the ones {run} learned on "
                        "(the data or the checkpoint changed since); train the policy again")
    (src, rows), (cal_src, cal_rows) = row_ids(learned_cache), row_ids(cal_cache)
    shared = int(np.isin(cal_rows, rows).sum()) if src == cal_src else 0
    if shared:
        cal = cal_cache.split if cal_cache.split in ("calib-a", "calib-b") else "calib-b"
        fit = "calib-a" if cal == "calib-b" else "calib-b"
        raise UserError(f"{run} learned on {learned['split']}; calibrating on {cal_cache.split} would reuse those rows "
                        f"({shared} of its {len(cal_rows)}): train it with --train-split {fit}, then calibrate it on "
                        f"{cal} (--cal-split {cal})")


# --------------------------------------------------------------------------- command
@dataclass
class Args:
    run: str | None = None
    """a policy run folder (agents.reinforce / agents.fqi / agents.sb3) to calibrate"""
    rule: str = "policy"
    """policy (with --run) or a heuristic: maxprob, entropy, patience, static (with --task)"""
    task: str | None = None
    """task of a heuristic rule (a policy run knows its task)"""
    task_file: str | None = None
    """your own task as a TOML/JSON file (instead of --task)"""
    risk: str = "consistency"
    """consistency (prediction differs from full depth) or accuracy_gap (full depth right, early exit wrong)"""
    epsilon: float = 0.02
    """the risk bound"""
    delta: float = 0.1
    """the probability that the bound fails"""
    cal_split: str | None = None
    """calibration rows: calib, calib-a or calib-b (default: calib for heuristics, the half of calib a policy did not learn on)"""
    protocol: str | None = None
    """how calib rows are obtained (default: the task's)"""
    checkpoint: str | None = None
    """stage-1 checkpoint (default: the run's, or the task's deployed one)"""
    data_dir: str | None = None
    """data directory (default $CEE_DATA_DIR or ../shared/data)"""
    trust_pickle: bool = False
    """allow an old SB3 run saved only as a pickled model.zip (runs its author's code)"""
    out: str | None = None
    """where to write calibration.json (default: the run folder, or runs/calibrate/<task>-<rule>-...)"""


def calibration_cache(task: str, split: str, checkpoint, protocol, data_dir) -> LayerCache:
    from cee_env.cache import get_cache

    return get_cache(task, split, checkpoint=checkpoint, protocol=protocol, data_dir=data_dir)


def calibrate(args: Args) -> dict:
    """Run Learn-then-Test for one rule; write and return the calibration record."""
    from agents.runtime import check_inputs
    from backbones.files import resolve_stored, write_json
    from backbones.paths import runs_dir

    if args.risk not in RISKS:
        raise UserError(f"--risk must be one of {', '.join(RISKS)}; got {args.risk!r}")
    if args.rule not in RULES:
        raise UserError(f"--rule must be one of {', '.join(RULES)}; got {args.rule!r}")
    policy, meta, checkpoint, task = None, {}, args.checkpoint, args.task
    if args.task_file:
        from backbones.tasks import load_task_file

        task = load_task_file(args.task_file).name
    if args.rule == "policy":
        if not args.run:
            raise UserError("--rule policy needs --run DIR (a trained policy run)")
        from agents.inference.early_exit_model import check_policy_fits, load_policy

        policy, meta = load_policy(Path(args.run), threshold=0.5, trust_pickle=args.trust_pickle)  # scores only
        learned = meta.get("learned_on") or {}
        if not learned.get("rows_sha256"):
            raise UserError(f"{args.run} records no hash of the rows it learned on (an older or co-trained run), so "
                            "calibration rows it never saw cannot be told apart; train it again (e.g. with "
                            "--train-split calib-a, then calibrate it on calib-b)")
        if checkpoint is None and meta.get("checkpoint"):
            checkpoint = str(resolve_stored(meta["checkpoint"]))
        check_policy_fits(args.run, meta, task=task, checkpoint=checkpoint)
        task = meta["task"]
        split = args.cal_split or {"calib-a": "calib-b", "calib-b": "calib-a", "train": "calib"}.get(learned["split"])
        if split is None:
            raise UserError(f"{args.run} learned on all of calib, so no calib rows are left that it never saw; "
                            "train it with --train-split calib-a (it is then calibrated on calib-b)")
    else:
        if not task:
            raise UserError(f"--rule {args.rule} needs --task (or --task-file)")
        split = args.cal_split or "calib"
    out = Path(args.out) if args.out else (Path(args.run) if args.run else
                                           runs_dir() / "calibrate" / f"{task}-{args.rule}-{args.risk}-e{args.epsilon:g}-d{args.delta:g}")
    check_inputs(args, out)
    cache = calibration_cache(task, split, checkpoint, args.protocol, args.data_dir)
    if args.rule == "policy":
        learned_cache = calibration_cache(task, learned["split"], checkpoint, args.protocol, args.data_dir)
        check_unseen(args.run, learned, learned_cache, cache)
    score, grid = rule_scores(args.rule, cache, policy)
    cal = learn_then_test([score], [grid], cache, args.risk, args.epsilon, args.delta)
    if args.rule == "policy" and cal.threshold is not None:
        cal.threshold = min(cal.threshold, 1.0)  # "never exit early" (+inf): pi(exit) never exceeds 1
    record = {**cal.to_dict(), "rule": args.rule, "task": task, "cal_split": split,
              "checkpoint": cache.meta.get("checkpoint"), "run": args.run,
              "policy_sha256": meta.get("sha256")}  # the policy files it was made for (checked where it is used)
    if cal.threshold is not None and args.rule != "policy":
        record["predict_rule"] = "full" if math.isinf(cal.threshold) else knob_value(args.rule, cal.threshold)
    if cal.threshold is None:
        raise UserError(
            f"no {args.rule} threshold keeps {args.risk} <= {args.epsilon:g} with probability {1 - args.delta:g} on "
            f"{cal.n} calibration instances ({split}); even zero errors need n >= {cal.min_n} "
            f"(log(delta)/log(1-epsilon)). Use more calibration data or a larger --epsilon / --delta.")
    write_json(out / CALIBRATION, record)
    print(f"{args.rule} on {task}: threshold {cal.threshold:.6g} keeps {args.risk} <= {args.epsilon:g} with "
          f"probability >= {1 - args.delta:g} (Learn-then-Test on {cal.n} {split} instances: {cal.errors} errors, "
          f"p = {cal.pvalue:.3g}); it saves {100 * cal.saved:.1f}% of the layers there.")
    if "predict_rule" in record:
        print(f"use it: python -m agents.predict --checkpoint {record['checkpoint']} --rule {record['predict_rule']} ...")
    print(f"written: {out / CALIBRATION}")
    return record


@user_errors
def main(argv: list[str] | None = None) -> dict:
    return calibrate(parse(Args, argv, __doc__))


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- checking the guarantee
def resplit_validation(scores: list[np.ndarray], pool: LayerCache, n_cal: int, risk: str, epsilon: float,
                       delta: float, reps: int = 200, seed: int = 0, grids: list[list[float]] | None = None) -> dict:
    """Check the guarantee empirically: treat ``pool`` as the population, draw ``reps`` calibration sets of
    ``n_cal`` rows from it i.i.d. (with replacement, so each is an exact i.i.d. sample of that population),
    calibrate on each (grids from the drawn scores) and compute the chosen rule's *population* risk, i.e. its
    risk on the whole pool. A violation is a population risk above epsilon; Learn-then-Test promises a
    violation frequency <= delta. Judging by the whole pool (not a finite held-out part) keeps the check free of
    the test part's own sampling noise. Returns the frequency, how often no value passed, and the mean
    population risk and saved layers of the chosen rules. ``grids``: fixed knob grids (chosen elsewhere);
    default, each draw's own conservative grid."""
    from cee_env.cache import take_rows as take

    import dataclasses

    pool = dataclasses.replace(pool, states=pool.states[:, :, :0])  # risks read predictions only: drop the states
    rng = np.random.default_rng(seed)
    n = pool.num_instances
    viol, refused, saved, risks = 0, 0, [], []
    for _ in range(reps):
        cal_idx = np.sort(rng.integers(0, n, size=n_cal))
        cal_c = take(pool, cal_idx)
        cs = [s[cal_idx] for s in scores]
        c = learn_then_test(cs, grids or [conservative_grid(s) for s in cs], cal_c, risk, epsilon, delta)
        if c.threshold is None:
            refused += 1
            e = np.full(n, pool.num_layers - 1)  # no guarantee possible: full depth, no risk
        else:
            e = exits_at(scores[c.path], c.threshold)
        r = float(risk_errors(e, pool, risk).mean())
        risks.append(r)
        viol += r > epsilon
        saved.append(1.0 - (e.mean() + 1) / pool.num_layers)
    return {"risk": risk, "epsilon": epsilon, "delta": delta, "reps": reps, "n_cal": n_cal, "n_population": n,
            "violation_frequency": viol / reps, "refused_frequency": refused / reps,
            "mean_population_risk": float(np.mean(risks)), "mean_population_saved": float(np.mean(saved))}
