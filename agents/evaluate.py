"""One evaluator for every exit policy (learned, heuristic, static, oracle).

Given a policy and a cached split, each instance exits at the first layer the
policy says so (the last layer otherwise) and is answered by that layer's
internal classifier. Reported: the task metric, average exit layer, saved
layers = 1 - avg/L, the exit histogram and the accuracy of the instances that
exited at each layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cee_env.cache import LayerCache


@dataclass
class EvalResult:
    policy: str
    metric_name: str
    metric: float  # accuracy or F1, in [0, 1]
    accuracy: float
    avg_exit_layer: float
    saved_layers: float  # 1 - avg_exit_layer / L
    num_layers: int
    n: int
    exit_hist: list[int]  # instances exiting at layers 1..L
    per_layer_accuracy: list[float | None]  # accuracy of the instances that exited at each layer
    exit_layers: np.ndarray | None = None  # [N] 1-based
    preds: np.ndarray | None = None  # [N]

    def to_dict(self, arrays: bool = False) -> dict:
        d = asdict(self)
        if arrays:
            d["exit_layers"] = self.exit_layers.tolist()
            d["preds"] = self.preds.tolist()
        else:
            d.pop("exit_layers"), d.pop("preds")
        return d

    def line(self) -> str:
        return (f"{self.policy:<28} {self.metric_name} {100 * self.metric:5.1f}  "
                f"avg exit {self.avg_exit_layer:4.2f}/{self.num_layers}  saved {100 * self.saved_layers:5.1f}%")


def first_exit(mask: np.ndarray) -> np.ndarray:
    """0-based index of the first True per row of a bool [N, L] mask (last column forced True)."""
    m = mask.copy()
    m[:, -1] = True
    return m.argmax(1)


def evaluate(policy, cache: LayerCache, metric_fn=None) -> EvalResult:
    """Score ``policy`` on ``cache`` (needs labels). ``metric_fn(preds, labels)`` defaults to the task's metric."""
    if not cache.has_labels:
        raise ValueError(f"{cache.task}/{cache.split} has no labels; cannot evaluate")
    exit0 = first_exit(np.asarray(policy.exit_mask(cache), dtype=bool))
    return score_exits(exit0, cache, getattr(policy, "name", type(policy).__name__), metric_fn)


def score_exits(exit0: np.ndarray, cache: LayerCache, name: str, metric_fn=None) -> EvalResult:
    """Score given 0-based exit layers per instance."""
    n, L = cache.num_instances, cache.num_layers
    labels = np.asarray(cache.labels)
    preds = np.asarray(cache.log_probs[np.arange(n), exit0].argmax(-1))
    if metric_fn is None:
        from backbones.tasks import compute_metric, get_task

        try:
            spec = get_task(cache.task)
            metric_fn = lambda p, y: compute_metric(spec, p, y)  # noqa: E731
            metric_name = spec.metric
        except Exception:  # a cache without a catalogued task (synthetic): accuracy
            metric_fn, metric_name = (lambda p, y: float((p == y).mean())), "accuracy"
    else:
        metric_name = cache.metric
    correct = preds == labels
    hist = np.bincount(exit0, minlength=L)
    per_layer = [float(correct[exit0 == l].mean()) if hist[l] else None for l in range(L)]
    avg = float(exit0.mean() + 1)
    return EvalResult(
        policy=name, metric_name=metric_name, metric=float(metric_fn(preds, labels)),
        accuracy=float(correct.mean()), avg_exit_layer=avg, saved_layers=1.0 - avg / L, num_layers=L, n=n,
        exit_hist=hist.tolist(), per_layer_accuracy=per_layer, exit_layers=exit0 + 1, preds=preds,
    )
