"""How much could any learned exit rule save with these observations? A probe of the information ceiling.

The benchmark's learned policies (REINFORCE, PPO, FQI on the ``confidence`` observation) save a
few points more than the best one-threshold heuristic. Is the rest of the gap to the oracle lost
by the RL algorithms, or is it not in what an exit rule at layer l can read? This probe skips RL:
per layer it fits a supervised classifier of "the prediction at layer l equals the full-depth
prediction" (the 0/1 consistency the policies are rewarded for) and exits at the first layer
whose predicted probability clears a threshold. It tries more expressive models and more
observations than the policies get:

- features ``confidence`` (the env's observation mode), ``+history`` (share of earlier layers
  agreeing with layer l, KL(p_l || p_{l-1}), layer l-1's probability of layer l's class, change of
  the max probability), ``+state`` (cosine of s_l and s_{l-1}, the norm of s_l, and an 8-component
  PCA of s_l fitted on the rows the model learns on);
- models: logistic regression and gradient-boosted trees (scikit-learn).

The protocol is the benchmark's: cross-fitted on calib (2 stratified folds, each scored by the
model fit on the other), the threshold chosen on calib at '<= 1 pt' (most calib layers saved
within 1 point of full depth), test (each task's dev split) read once. Max probability (Right-Tool)
is the reference row, chosen the same way. Calib is small (M-CID: a few hundred rows), so the probe is
repeated over fold splits (``--seeds``) and the table gives the mean and standard deviation.

    python -m benchmarks.exit_ceiling --tasks SST2 MCID StackOverflow

Writes runs/benchmark/exit_ceiling.json and prints a markdown table.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from agents.benchmark import (
    BenchmarkConfig,
    calib_folds,
    choose,
    crossfit_scores,
    exits_at,
    load_caches,
    score_points,
    threshold_grid,
)
from agents.evaluate import score_exits
from backbones.cli import UserError, parse, user_errors
from backbones.files import write_json
from backbones.paths import runs_dir
from cee_env.cache import LayerCache
from cee_env.observations import confidence_features

FEATURES = ("confidence", "confidence+history", "confidence+state")
MODELS = ("logreg", "boosted")


@dataclass
class Args:
    tasks: tuple[str, ...] = ("SST2", "MCID", "StackOverflow")
    """tasks to probe (their deployed holdout backbone and caches are built if missing)"""
    max_drop: float = 1.0
    """the operating point: most calib layers saved within this many points of full depth on calib"""
    pca: int = 8
    """PCA components of the pooled state in the '+state' features"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """fold splits (and model seeds) to repeat the probe with: calib is small, one split can flatter a probe"""
    data_dir: str | None = None
    """data directory (default: $CEE_DATA_DIR or ../shared/data)"""
    out: str | None = None
    """JSON output (default runs/benchmark/exit_ceiling.json)"""


def history_features(log_probs: np.ndarray) -> np.ndarray:
    """[N, L, 4]: share of layers 1..l-1 agreeing with layer l's class, tanh KL(p_l || p_{l-1}),
    p_{l-1} of layer l's class, max p_l - max p_{l-1} (0 at layer 1)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    p, pred = np.exp(lp), lp.argmax(-1)
    n, L, _ = lp.shape
    out = np.zeros((n, L, 4))
    for l in range(1, L):
        out[:, l, 0] = (pred[:, :l] == pred[:, l:l + 1]).mean(1)
        out[:, l, 1] = np.tanh((p[:, l] * (lp[:, l] - lp[:, l - 1])).sum(-1))
        out[:, l, 2] = p[np.arange(n), l - 1, pred[:, l]]
        out[:, l, 3] = p[:, l].max(-1) - p[:, l - 1].max(-1)
    return out


def state_summary(states: np.ndarray) -> np.ndarray:
    """[N, L, 2]: cosine of s_l and s_{l-1} (0 at layer 1) and |s_l| / 10."""
    s = np.asarray(states, dtype=np.float64)
    norm = np.linalg.norm(s, axis=-1)
    unit = s / (norm[..., None] + 1e-9)
    cos = np.zeros(s.shape[:2])
    cos[:, 1:] = (unit[:, 1:] * unit[:, :-1]).sum(-1)
    return np.stack([cos, norm / 10.0], -1)


class Probe:
    """Per layer 1..L-1, P(prediction at l == full-depth prediction | features), fit on one cache."""

    def __init__(self, features: str, model: str, pca: int, seed: int) -> None:
        self.features, self.model, self.pca, self.seed = features, model, pca, seed

    def _x(self, c: LayerCache) -> np.ndarray:
        parts = [confidence_features(c.log_probs, c.num_layers)]
        if self.features == "confidence+history":
            parts.append(history_features(c.log_probs))
        if self.features == "confidence+state":
            parts.append(state_summary(c.states))
            parts.append(np.stack([self.pcas[l].transform(c.states[:, l].astype(np.float64))
                                   for l in range(c.num_layers)], 1))
        return np.concatenate(parts, -1)

    def _new(self):
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.model == "logreg":
            return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.05, max_leaf_nodes=15,
                                              min_samples_leaf=20, random_state=self.seed)

    def fit(self, c: LayerCache) -> Probe:
        from sklearn.decomposition import PCA

        L = c.num_layers
        if self.features == "confidence+state":
            self.pcas = [PCA(self.pca, random_state=self.seed).fit(c.states[:, l].astype(np.float64))
                         for l in range(L)]
        x, pred = self._x(c), c.log_probs.argmax(-1)
        y = pred == pred[:, -1:]
        self.models = []
        for l in range(L - 1):
            if y[:, l].all() or not y[:, l].any():  # one class: a constant
                self.models.append(float(y[0, l]))
            else:
                self.models.append(self._new().fit(x[:, l], y[:, l]))
        return self

    def score(self, c: LayerCache) -> np.ndarray:
        x, out = self._x(c), np.ones((c.num_instances, c.num_layers))
        for l, m in enumerate(self.models):
            out[:, l] = m if isinstance(m, float) else m.predict_proba(x[:, l])[:, 1]
        return out


def probe_task(task: str, args: Args) -> list[dict]:
    """Every probe on one task, once per fold split in ``args.seeds``; the caches are loaded once."""
    caches = load_caches(task, BenchmarkConfig(tasks=(task,), data_dir=args.data_dir), None, None)
    calib = caches["calib"]
    L = calib.num_layers
    full = {s: score_exits(np.full(c.num_instances, L - 1), c, "full").metric for s, c in caches.items()}
    rows = []

    def add(name: str, seed: int, scores: dict[str, np.ndarray], seconds: float) -> None:
        """The benchmark's own choice: the calib point with the most saved layers within the drop."""
        knobs = [({"threshold": t}, t) for t in threshold_grid(scores["calib"], 200)]
        chosen = choose(score_points(task, name, {"calib": scores["calib"]}, caches, knobs), full["calib"],
                        args.max_drop / 100)
        row = {"task": task, "probe": name, "seed": seed, "seconds": round(seconds, 1), "calib_n": calib.num_instances}
        if chosen is not None:
            for label, split in (("calib", "calib"), ("test", "dev")):
                r = score_exits(exits_at(scores[split], chosen["knob"]["threshold"]), caches[split], name)
                row[label] = {"metric": r.metric, "change": r.metric - full[split], "saved": r.saved_layers}
        rows.append(row)
        cell = lambda r: (f"{100 * r['saved']:.1f}% ({100 * r['change']:+.1f})" if r else "-")
        print(f"  [{task} seed {seed}] {name:34s} calib {cell(row.get('calib'))}  test {cell(row.get('test'))}", flush=True)

    maxprob = {s: confidence_features(c.log_probs, L)[..., 0] for s, c in caches.items()}
    for seed in args.seeds:
        folds = calib_folds(calib, 2, seed)
        add("max probability (Right-Tool)", seed, maxprob, 0.0)
        for feats in FEATURES:
            for model in MODELS:
                t0 = time.time()
                fit = lambda train, held, j, f=feats, m=model, sd=seed: Probe(f, m, args.pca, sd).fit(train).score
                add(f"{model}, {feats}", seed, crossfit_scores(fit, caches, folds), time.time() - t0)
    return rows


def markdown(rows: list[dict], tasks: tuple[str, ...]) -> str:
    """Per probe and task: mean saved layers over the seeds (sd), then the mean score change, on calib and test;
    a seed where no threshold stays within the drop on calib counts as 0% saved, 0 change."""
    probes = list(dict.fromkeys(r["probe"] for r in rows))
    head = "| probe | " + " | ".join(f"{t} calib | {t} test" for t in tasks) + " |"
    lines = [head, "|---" * (1 + 2 * len(tasks)) + "|"]
    for p in probes:
        cells = []
        for t in tasks:
            mine = [r for r in rows if r["task"] == t and r["probe"] == p]
            for split in ("calib", "test"):
                v = [r.get(split) or {"saved": 0.0, "change": 0.0} for r in mine]
                saved = 100 * np.array([x["saved"] for x in v])
                change = 100 * np.mean([x["change"] for x in v]) if v else float("nan")
                cells.append(f"{saved.mean():.1f}% ± {saved.std():.1f} ({change:+.1f})" if v else "-")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@user_errors
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(Args, argv, __doc__)
    if not (args.max_drop >= 0 and np.isfinite(args.max_drop)) or args.pca < 1:
        raise UserError(f"--max-drop must be a finite number >= 0 and --pca >= 1; got {args.max_drop}, {args.pca}")
    rows = [r for t in args.tasks for r in probe_task(t, args)]
    out = Path(args.out) if args.out else runs_dir() / "benchmark" / "exit_ceiling.json"
    write_json(out, {"args": vars(args), "rows": rows}, indent=2)
    print(markdown(rows, args.tasks))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
