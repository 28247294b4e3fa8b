import math

import numpy as np
import pytest
import torch

from agents.evaluate import evaluate, first_exit, score_exits
from agents.policies import LayerMLPPolicy, LearnedExit, OracleExit, StaticExit
from agents.reinforce import Args, train
from agents.rl.losses import reinforce_loss
from cee_env import make_synthetic_cache
from cee_env.cache import LayerCache


def test_reinforce_loss_two_instances_by_hand():
    # Two instances, K = 2 trajectories each; at most 2 steps (layers).
    # Trajectory columns: (i0,k0) (i0,k1) (i1,k0) (i1,k1)
    p = [[0.2, 0.2, 0.7, 0.7],  # pi(exit | s_1)
         [0.6, 0.5, 0.5, 0.9]]  # pi(exit | s_2)
    logits = torch.logit(torch.tensor(p, dtype=torch.float64))
    actions = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float64)  # second row only matters if alive
    alive = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.float64)
    returns = torch.tensor([-0.5, -0.1, 0.3, -0.4], dtype=torch.float64)
    # log pi(tau): exit at 1 -> log p1; continue then exit -> log(1-p1) + log p2
    logp_tau = [math.log(0.2), math.log(0.8) + math.log(0.5), math.log(0.7), math.log(0.3) + math.log(0.9)]
    b0, b1 = (-0.5 - 0.1) / 2, (0.3 - 0.4) / 2
    adv = [-0.5 - b0, -0.1 - b0, 0.3 - b1, -0.4 - b1]
    expected = -sum(a * l for a, l in zip(adv, logp_tau)) / 4
    got = reinforce_loss(logits, actions, alive, returns, k=2)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_reinforce_gradient_raises_exit_prob_of_better_trajectory():
    logits = torch.zeros(1, 2, requires_grad=True)  # one step, one instance, K = 2
    loss = reinforce_loss(logits, torch.tensor([[1.0, 0.0]]), torch.ones(1, 2), torch.tensor([1.0, 0.0]), k=2)
    loss.backward()
    # Trajectory 0 exited and earned more, trajectory 1 continued and earned less: both say
    # "raise the exit probability", so gradient descent moves both logits up.
    assert logits.grad[0, 0] < 0 and logits.grad[0, 1] < 0
    # With equal returns there is no signal at all (the baseline removes it).
    logits.grad = None
    reinforce_loss(logits, torch.tensor([[1.0, 0.0]]), torch.ones(1, 2), torch.tensor([0.3, 0.3]), k=2).backward()
    assert torch.count_nonzero(logits.grad) == 0


def _tiny_cache(preds: np.ndarray, labels: np.ndarray, c: int = 2) -> LayerCache:
    n, L = preds.shape
    logp = np.full((n, L, c), math.log(0.1 / (c - 1)), dtype=np.float32)
    logp[np.arange(n)[:, None], np.arange(L)[None], preds] = math.log(0.9)
    return LayerCache(states=np.zeros((n, L, 4), np.float32), log_probs=logp, labels=labels)


def test_evaluator_static_oracle_and_histogram():
    preds = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 0], [1, 0, 1]])
    labels = np.array([1, 1, 1, 1])
    cache = _tiny_cache(preds, labels)
    full = evaluate(StaticExit(3), cache)
    assert full.accuracy == pytest.approx(3 / 4) and full.avg_exit_layer == 3 and full.saved_layers == 0
    first = evaluate(StaticExit(1), cache)
    assert first.accuracy == pytest.approx(2 / 4) and first.saved_layers == pytest.approx(2 / 3)
    orc = evaluate(OracleExit(), cache)
    assert orc.exit_layers.tolist() == [1, 2, 3, 1]
    assert orc.exit_hist == [2, 1, 1]
    assert orc.per_layer_accuracy == [1.0, 1.0, 0.0]
    assert orc.accuracy == pytest.approx(3 / 4)
    assert first_exit(np.zeros((2, 3), bool)).tolist() == [2, 2]
    assert score_exits(np.array([0, 1, 2, 2]), cache, "x").exit_layers.tolist() == [1, 2, 3, 3]


def test_learned_exit_mask_agrees_with_layerwise_decisions():
    cache = make_synthetic_cache(n=64, num_layers=4, hidden=12, seed=3)
    torch.manual_seed(0)
    net = LayerMLPPolicy(12, 4)
    net.set_normaliser(cache.states)
    pol = LearnedExit(net)
    mask = pol.exit_mask(cache)
    for l in range(3):
        np.testing.assert_array_equal(mask[:, l], pol.exit_at_layer(l, cache.states[:, : l + 1], cache.log_probs[:, : l + 1]))


def test_short_reinforce_run_beats_random_policy_on_synthetic_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path))
    caches = {s: make_synthetic_cache(n=256, num_layers=4, hidden=12, split=s, seed=1) for s in ("train", "dev")}
    args = Args(env="cee/Synthetic-v0", alpha=0.3, reward="vanilla", epochs=25, batch_size=16, k=4, lr=1e-2,
                eval_every=100, quiet=True, seed=0)
    out = train(args, caches)
    dev = caches["dev"]
    learned = evaluate(out["policy"], dev)
    # A random policy (exit with probability 1/2 at each layer) on the same instances, by its expected reward.
    rng = np.random.default_rng(0)
    exits = np.minimum(rng.geometric(0.5, size=(20, dev.num_instances)), dev.num_layers) - 1
    random_acc = np.mean([score_exits(e, dev, "random").accuracy for e in exits])
    assert learned.accuracy > random_acc + 0.2
    # The right exit is the difficulty d: the learned policy exits within one layer of it for most instances.
    d = dev.meta["difficulty"]
    assert np.mean(np.abs(learned.exit_layers - d) <= 1) > 0.7
    assert (tmp_path / "reinforce").is_dir()


def test_reinforce_env_step_budget_stops_mid_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path))
    caches = {s: make_synthetic_cache(n=256, num_layers=4, hidden=12, split=s, seed=1) for s in ("train", "dev")}
    # One update is 16 instances x 4 trajectories of 1-4 steps (64-256 env steps); an epoch is 16 updates.
    args = Args(env="cee/Synthetic-v0", alpha=0.3, reward="vanilla", epochs=1, total_env_steps=5000,
                batch_size=16, k=4, eval_every=100, quiet=True, seed=0)
    res = train(args, caches)["results"]
    assert 5000 <= res["env_steps"] < 5000 + 16 * 4 * 4
    assert res["epochs"] > 1  # --epochs is replaced by the budget
    assert res["reward_curve"][-1][0] == res["env_steps"]


def test_reinforce_leaves_the_forced_last_exit_out_of_log_pi(tmp_path, monkeypatch):
    # At layer L the env exits whatever the action: that step is no decision, so Eq 5 must not push pi there
    # (joint_loss already leaves it out). The last layer's MLP gets no gradient: Adam leaves it as it started.
    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path))
    caches = {s: make_synthetic_cache(n=64, num_layers=4, hidden=12, split=s, seed=1) for s in ("train", "dev")}
    torch.manual_seed(0)
    start = LayerMLPPolicy(12, 4, hidden=8)
    start.save(tmp_path / "start")
    args = Args(env="cee/Synthetic-v0", epochs=3, batch_size=16, k=4, hidden=8, quiet=True, eval_every=100,
                init_policy=str(tmp_path / "start"), eps_start=0.5)
    net = train(args, caches)["policy"].net
    for name in ("w1", "b1", "w2", "b2"):
        before, after = getattr(start, name).detach(), getattr(net, name).detach()
        assert torch.equal(before[3], after[3]), name  # layer L: untouched
        assert not torch.equal(before[:3], after[:3]), name  # layers 1..L-1: trained
