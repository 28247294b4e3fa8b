import numpy as np
import pytest

from cee_env.hardness import (
    forgetting_events,
    memorized_histogram,
    memorized_layer,
    oracle_exit,
    table1_correlation,
)
from cee_env.rewards import REWARDS, exit_reward


def _preds(correct_rows, labels):
    """Prediction table from a correct/incorrect pattern (wrong = label + 1 mod 3)."""
    c = np.array(correct_rows, dtype=bool)
    y = np.asarray(labels)
    return np.where(c, y[:, None], (y[:, None] + 1) % 3), y


def test_memorized_layer_cases():
    preds, y = _preds(
        [
            [1, 1, 1, 1, 1, 1],  # always correct -> 1
            [0, 0, 0, 0, 0, 0],  # never correct -> L
            [1, 1, 0, 1, 1, 1],  # correct, forgotten, relearned -> 4
            [1, 1, 1, 1, 1, 0],  # last layer wrong -> L
            [0, 0, 0, 0, 0, 1],  # only last -> L
            [0, 1, 1, 1, 1, 1],  # -> 2
        ],
        [0, 1, 2, 0, 1, 2],
    )
    m = memorized_layer(preds, y)
    assert m.dtype == np.int64
    assert m.tolist() == [1, 6, 4, 6, 6, 2]


def test_memorized_layer_unlabeled_and_shapes():
    assert memorized_layer(np.zeros((2, 3), int), np.array([-1, 0])).tolist() == [3, 1]
    with pytest.raises(ValueError):
        memorized_layer(np.zeros((2, 3), int), np.zeros(3, int))


def test_oracle_exit():
    preds, y = _preds([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]], [0, 1, 2, 0])
    assert oracle_exit(preds, y).tolist() == [3, 1, 4, 2]


def test_forgetting_events():
    h = np.array(
        [
            [1, 0, 1, 1],
            [0, 1, 1, 0],
            [1, 0, 1, 1],
            [0, 1, 0, 1],
        ],
        dtype=bool,
    )  # [E=4, N=4]
    assert forgetting_events(h).tolist() == [2, 1, 1, 1]
    assert forgetting_events(np.ones((1, 3), bool)).tolist() == [0, 0, 0]


def test_table1_correlation_monotone():
    m = np.array([1, 2, 3, 4, 5, 6])
    out = table1_correlation(m, m ** 2 + 0.5, forgetting=-m)
    assert out["rho_loss"] == pytest.approx(1.0)
    assert out["rho_forgetting"] == pytest.approx(-1.0)
    assert out["p_loss"] < 0.01 and out["n"] == 6
    assert "rho_forgetting" not in table1_correlation(m, m)


def test_memorized_histogram():
    assert memorized_histogram(np.array([1, 1, 3, 6]), 6).tolist() == [2, 0, 1, 0, 0, 1]
    with pytest.raises(ValueError):
        memorized_histogram(np.array([0]), 6)


def test_exit_reward_formulas():
    lp, t, a, m, L = np.log(0.7), 2, 0.1, 3, 6
    assert exit_reward(lp, t, a, "vanilla") == pytest.approx(lp - 0.2)
    assert exit_reward(lp, t, a, "hardness", m, L) == pytest.approx(lp - 0.2 * 0.5)
    assert exit_reward(lp, t, a, "hardness_weighted", m, L) == pytest.approx(0.5 * lp - 0.5 * 0.2)
    assert exit_reward(lp, t, a, memorized=m, num_layers=L) == exit_reward(lp, t, a, "hardness", m, L)
    # vectorised broadcast [N, 1] x [1, L]
    r = exit_reward(np.zeros((2, 3)), np.arange(1, 4)[None], 1.0, "hardness", np.array([[3], [1]]), 3)
    np.testing.assert_allclose(r, [[0, 0, 0], [-2 / 3, -4 / 3, -2]])
    with pytest.raises(ValueError, match="hardness_weighted"):
        exit_reward(lp, t, a, "nope")
    with pytest.raises(ValueError):
        exit_reward(lp, t, a, "hardness")
    assert REWARDS[0] == "hardness"
