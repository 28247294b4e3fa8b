"""Baselines (DeeBERT, Right-Tool, PABEE, BERxiT) and the accuracy-speed benchmark, on hand-made and synthetic caches."""
import math

import numpy as np
import pytest

from agents.policies.heuristics import (
    BerxitExit,
    EntropyExit,
    LTEConfig,
    MaxProbExit,
    PatienceExit,
    patience_counters,
    prediction_entropy,
    threshold_grid,
    train_lte,
)
from agents.evaluate import evaluate
from agents.policies import ExitPolicy
from cee_env import make_synthetic_cache
from cee_env.cache import LayerCache


def _cache(probs, labels, states=None) -> LayerCache:
    probs = np.asarray(probs, dtype=np.float64)
    n, L, _ = probs.shape
    st = np.zeros((n, L, 4), np.float32) if states is None else np.asarray(states, np.float32)
    return LayerCache(states=st, log_probs=np.log(probs).astype(np.float32), labels=np.asarray(labels, np.int64))


def _preds_cache(preds, labels=None, c: int = 3) -> LayerCache:
    """Predictions given per layer; the predicted class gets 0.8, the rest share 0.2."""
    preds = np.asarray(preds)
    n, L = preds.shape
    p = np.full((n, L, c), 0.2 / (c - 1))
    p[np.arange(n)[:, None], np.arange(L)[None], preds] = 0.8
    return _cache(p, np.zeros(n, int) if labels is None else labels)


def _exit_layers(policy, cache) -> list[int]:
    return evaluate(policy, cache).exit_layers.tolist()


# --------------------------------------------------------------------------- DeeBERT / Right-Tool
# Entropies (nats) of the binary rows: [.5,.5] 0.693, [.7,.3] 0.611, [.9,.1] 0.325, [.99,.01] 0.056.
ROWS = {0.5: [0.5, 0.5], 0.7: [0.7, 0.3], 0.9: [0.9, 0.1], 0.99: [0.99, 0.01]}
TABLE = [[0.5, 0.7, 0.9, 0.99],   # confidence rises layer by layer
         [0.99, 0.5, 0.5, 0.5],   # confident at once
         [0.5, 0.5, 0.5, 0.5],    # never confident
         [0.7, 0.9, 0.7, 0.99]]   # non-monotone


def _table_cache():
    return _cache([[ROWS[v] for v in row] for row in TABLE], labels=[0, 0, 0, 0])


def test_entropy_values():
    lp = np.log(np.array([[0.5, 0.5], [0.9, 0.1], [1.0, 1e-30]]))
    h = prediction_entropy(lp)
    assert h[0] == pytest.approx(math.log(2))
    assert h[1] == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))
    assert h[2] == pytest.approx(0.0, abs=1e-12)
    assert prediction_entropy(np.array([[0.0, -np.inf]]))[0] == 0.0  # p = 0 contributes nothing


@pytest.mark.parametrize("threshold, expected", [
    (0.4, [3, 1, 4, 2]),    # entropy < 0.4 first at [.9,.1] (0.325)
    (0.1, [4, 1, 4, 4]),    # only [.99,.01] (0.056)
    (0.65, [2, 1, 4, 1]),   # [.7,.3] (0.611) qualifies too
    (0.0, [4, 4, 4, 4]),    # entropy >= 0: never early
    (1.0, [1, 1, 1, 1]),    # above ln 2: always at layer 1
])
def test_deebert_entropy_threshold(threshold, expected):
    cache = _table_cache()
    assert _exit_layers(EntropyExit(threshold), cache) == expected
    # Layer by layer, causally (only layers 1..l shown): the first "exit" is the expected layer.
    pol, L = EntropyExit(threshold), cache.num_layers
    asked = np.stack([pol.exit_at_layer(l, None, cache.log_probs[:, : l + 1]) for l in range(L - 1)]
                     + [np.ones(4, bool)], axis=1)
    assert (asked.argmax(1) + 1).tolist() == expected


@pytest.mark.parametrize("threshold, expected", [
    (0.8, [3, 1, 4, 2]),
    (0.95, [4, 1, 4, 4]),
    (0.6, [2, 1, 4, 1]),
    (0.999, [4, 4, 4, 4]),
    (0.4, [1, 1, 1, 1]),    # max prob of a 2-class output is >= 0.5
])
def test_maxprob_threshold(threshold, expected):
    assert _exit_layers(MaxProbExit(threshold), _table_cache()) == expected


def test_deebert_and_maxprob_agree_on_two_classes():
    # With 2 classes entropy is decreasing in max prob, so the two rules trace the same exits.
    cache = _table_cache()
    for p in (0.6, 0.8, 0.95):
        h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        assert _exit_layers(MaxProbExit(p), cache) == _exit_layers(EntropyExit(h), cache)


# --------------------------------------------------------------------------- PABEE
def _pabee_reference(pred_row, patience: int) -> int:
    """PABEE's inference loop (pabee/modeling_bert.py, BertModel.forward), one instance: layers computed."""
    if patience == 0:  # the `self.patience == 0` branch: all layers
        return len(pred_row)
    patient_counter, patient_result, calculated = 0, None, 0
    for label in pred_row:
        calculated += 1
        if patient_result is not None and label == patient_result:
            patient_counter += 1
        else:
            patient_counter = 0
        patient_result = label
        if patient_counter == patience:
            break
    return calculated


def test_pabee_counters_by_hand():
    preds = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 0, 0, 0, 1], [2, 0, 2, 0, 2]])
    assert patience_counters(preds).tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 0, 1], [0, 0, 1, 2, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("patience, expected", [
    (1, [2, 3, 3, 5]),   # first repeat; layer 1 can never exit (no previous prediction)
    (2, [3, 5, 4, 5]),   # three equal in a row; row 2 never gets there -> last layer
    (3, [4, 5, 5, 5]),
    (4, [5, 5, 5, 5]),   # p = L - 1: only the full model
    (9, [5, 5, 5, 5]),
    (0, [5, 5, 5, 5]),   # PABEE's patience 0 = no early exit
])
def test_pabee_patience_rule(patience, expected):
    preds = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 0, 0, 0, 1], [2, 0, 2, 0, 2]])
    cache = _preds_cache(preds)
    assert _exit_layers(PatienceExit(patience), cache) == expected
    assert expected == [_pabee_reference(r, patience) for r in preds.tolist()]


def test_pabee_first_layers_edge():
    cache = _preds_cache(np.array([[2, 2, 2], [1, 2, 2]]))
    pol = PatienceExit(1)
    assert pol.exit_at_layer(0, None, cache.log_probs[:, :1]).tolist() == [False, False]  # nothing to compare yet
    assert pol.exit_at_layer(1, None, cache.log_probs[:, :2]).tolist() == [True, False]
    assert pol.exit_at_layer(2, None, cache.log_probs[:, :3]).tolist() == [True, True]


def test_pabee_matches_reference_loop_on_random_predictions():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 2, size=(300, 8))
    preds[:100] = rng.integers(0, 3, size=(100, 8))
    cache = _preds_cache(preds)
    for p in range(0, 9):
        assert _exit_layers(PatienceExit(p), cache) == [_pabee_reference(r, p) for r in preds.tolist()]
    with pytest.raises(ValueError, match="patience"):
        PatienceExit(-1)


# --------------------------------------------------------------------------- BERxiT
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_berxit_head_learns_correctness(loss):
    # Synthetic cache: layer l is right iff l >= d_i, and the state's dim 2L says exactly that.
    train = make_synthetic_cache(n=300, num_layers=5, hidden=12, split="train", seed=1)
    dev = make_synthetic_cache(n=200, num_layers=5, hidden=12, split="dev", seed=1)
    head = train_lte(train, LTEConfig(loss=loss, epochs=15, lr=3e-2, seed=0))
    q = BerxitExit(head, 0.5).scores(dev)
    correct = dev.preds == dev.labels[:, None]
    assert q.shape == (200, 5)
    auc = (q[correct][:, None] > q[~correct][None, :]).mean()  # P(score of a right layer > a wrong one)
    assert auc > 0.99
    assert q[correct].mean() > 0.8 and q[~correct].mean() < 0.2
    res = evaluate(BerxitExit(head, 0.5), dev)
    assert res.accuracy > 0.97
    # It exits (almost always) exactly at the first ready layer, the oracle's layer.
    assert (res.exit_layers == dev.meta["difficulty"]).mean() > 0.95


def test_berxit_threshold_is_monotone_and_rejects_bad_input():
    train = make_synthetic_cache(n=200, num_layers=4, hidden=10, split="train")
    head = train_lte(train, LTEConfig(epochs=3))
    avgs = [evaluate(BerxitExit(head, t), train).avg_exit_layer for t in (0.0, 0.3, 0.6, 0.9, 1.0)]
    assert avgs == sorted(avgs) and avgs[0] == 1.0 and avgs[-1] == 4.0
    with pytest.raises(ValueError, match="loss"):
        train_lte(train, LTEConfig(loss="hinge"))
    unlabelled = LayerCache(states=train.states, log_probs=train.log_probs, labels=np.full(200, -1))
    with pytest.raises(ValueError, match="no labels"):
        train_lte(unlabelled)


# --------------------------------------------------------------------------- vectorised == layer by layer
def _random_cache(n=120, L=6, C=3, H=8, seed=0) -> LayerCache:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(C, 0.7), size=(n, L))
    states = rng.standard_normal((n, L, H)).astype(np.float32)
    return _cache(np.clip(probs, 1e-9, 1), rng.integers(0, C, n), states)


def test_exit_mask_equals_layerwise_for_every_baseline():
    cache = _random_cache()
    head = train_lte(cache, LTEConfig(epochs=2))
    q = BerxitExit(head, 0.5).scores(cache)
    policies = [EntropyExit(t) for t in (0.0, 0.3, 0.6, 0.9, 1.2)]
    policies += [MaxProbExit(t) for t in (0.34, 0.5, 0.7, 0.9, 1.0)]
    policies += [PatienceExit(p) for p in range(0, 7)]
    policies += [BerxitExit(head, t) for t in [0.0, 1.0, *np.quantile(q, [0.1, 0.5, 0.9])]]
    for pol in policies:
        fast = pol.exit_mask(cache)
        slow = ExitPolicy.exit_mask(pol, cache)  # the base class asks exit_at_layer layer by layer
        assert fast.dtype == bool and fast.shape == (120, 6), pol.name
        np.testing.assert_array_equal(fast, slow, err_msg=pol.name)
        assert fast[:, -1].all()
    # Not trivial: the rules do exit early somewhere and not everywhere.
    assert 0 < EntropyExit(0.6).exit_mask(cache)[:, :-1].mean() < 1


def test_threshold_grid_covers_range_and_quantiles():
    g = threshold_grid(np.array([0.2, 0.4, 0.4, 0.9]), 0.0, 1.0, n=5)
    assert g[0] == 0.0 and g[-1] == 1.0 and 0.4 in g and 0.9 in g and g == sorted(set(g))


# --------------------------------------------------------------------------- operating points
def _pt(method, saved, metric, split="dev", knob=None, task="T", seed=None):
    return {"task": task, "method": method, "knob": knob if knob is not None else {"v": saved}, "split": split,
            "metric": metric, "saved": saved, "seed": seed, "accuracy": metric, "avg_exit": 6 * (1 - saved),
            "metric_name": "accuracy", "num_layers": 6, "n": 10, "exit_hist": []}
