import json

import numpy as np
import pytest
import torch

from agents import cotrain
from agents.policies.net import LayerMLPPolicy
from agents.rl.losses import exit_layer_loss, joint_loss
from tests.conftest import TINY_TASK, TINY_TRAIN, register_tiny_task


@pytest.fixture(scope="module")
def holdout_ckpt(tmp_path_factory, tiny_task_files, tiny_encoder_dir):
    """A tiny stage-1 checkpoint with 30% of the train rows held out (co-training's calib rows)."""
    import backbones.train as tr

    root = tmp_path_factory.mktemp("cotrain_stage1")
    register_tiny_task(tiny_task_files)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CEE_RUNS_DIR", str(root))
        return tr.train(tr.TrainConfig(task=TINY_TASK, model=str(tiny_encoder_dir), holdout=0.3,
                                       out=str(root / "ckpt"), save_every=0, **TINY_TRAIN))


class _FixedExit(torch.nn.Module):
    """A stand-in exit network: exits at a fixed 0-based layer per instance."""

    def __init__(self, exits, num_layers):
        super().__init__()
        self.exits, self.L = torch.as_tensor(exits), num_layers

    def forward(self, states):
        logits = torch.full((states.shape[0], self.L), -50.0)
        logits[torch.arange(states.shape[0]), self.exits] = 50.0
        return logits


def test_eq6_loss_is_cross_entropy_at_the_policy_exit_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    states = torch.randn(3, 4, 5)
    loss = exit_layer_loss(logits, states, labels, _FixedExit([0, 2, 3], 4))
    expected = torch.nn.functional.cross_entropy(logits[torch.arange(3), torch.tensor([0, 2, 3])], labels)
    assert torch.allclose(loss, expected)
    loss.backward()
    used = torch.zeros(3, 4, dtype=torch.bool)
    used[torch.arange(3), torch.tensor([0, 2, 3])] = True
    assert torch.all(logits.grad[~used] == 0) and torch.all(logits.grad[used].abs().sum(-1) > 0)


def test_no_exit_means_last_layer():
    logits = torch.randn(2, 3, 2)
    net = _FixedExit([0, 0], 3)
    net.forward = lambda s: torch.full((2, 3), -1.0)  # pi < 0.5 everywhere
    loss = exit_layer_loss(logits, torch.zeros(2, 3, 4), torch.tensor([1, 0]), net)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits[:, -1], torch.tensor([1, 0])))


def test_joint_loss_with_a_deterministic_policy_is_eq6_and_its_policy_gradient_vanishes():
    # A policy that exits at fixed layers with probability ~1 samples the same exit K times:
    # the CE part is Eq 6 and every trajectory's reward equals the baseline.
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    loss, parts = joint_loss(logits, torch.randn(3, 4, 5), labels, torch.tensor([1, 4, 2]),
                             _FixedExit([0, 2, 3], 4), alpha=0.1, reward="hardness", k=4)
    expected = torch.nn.functional.cross_entropy(logits[torch.arange(3), torch.tensor([0, 2, 3])], labels)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert parts["policy_loss"] == 0.0 and abs(parts["exit_layer"] - 8 / 3) < 1e-6
    # Hardness reward of the exits by hand: log p_t(y) - alpha * t * (1 - m/L).
    logp = logits.detach().log_softmax(-1)
    r = [logp[0, 0, 0] - 0.1 * 1 * (1 - 1 / 4), logp[1, 2, 1] - 0.1 * 3 * 0.0, logp[2, 3, 1] - 0.1 * 4 * (1 - 2 / 4)]
    assert abs(parts["reward"] - float(sum(r)) / 3) < 1e-5


def test_joint_loss_trains_the_policy_towards_the_better_exit():
    # Two layers; layer 1 is right with high confidence and layer 2 wrong for every instance:
    # the policy gradient must raise the exit probability at layer 1, and CE reaches only
    # the sampled exit layers.
    torch.manual_seed(0)
    n, L = 64, 2
    logits = torch.zeros(n, L, 2)
    logits[:, 0, 1], logits[:, 1, 0] = 4.0, 4.0
    logits.requires_grad_(True)
    labels = torch.ones(n, dtype=torch.long)
    states = torch.randn(n, L, 3)
    net = LayerMLPPolicy(3, L, hidden=8)
    p_before = torch.sigmoid(net(states)[:, 0]).mean().item()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(30):
        loss, parts = joint_loss(logits, states, labels, torch.full((n,), L), net, alpha=0.01, reward="vanilla", k=4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p_after = torch.sigmoid(net(states)[:, 0]).mean().item()
    assert p_after > p_before + 0.3 and p_after > 0.9
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_cotrain_round_trip_and_resume(holdout_ckpt, tiny_task, tmp_runs, capsys):
    ckpt = holdout_ckpt
    args = cotrain.Args(env=f"cee/{TINY_TASK}-v0", rounds=1, tol=0.0, alpha=0.05, policy_epochs=2,
                        backbone_epochs=1, backbone_lr=1e-3, head_lr=1e-3, checkpoint=str(ckpt), name="t")
    summary = cotrain.run(args)
    root = tmp_runs / "cotrain" / "t"
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert (root / "round-0" / "policy" / "policy.safetensors").is_file()
    new_ckpt = root / "round-0" / "backbone"
    assert (new_ckpt / "model.safetensors").is_file() and (new_ckpt / "metrics.json").is_file()
    # Eq 6 changed the backbone: round 1's caches come from different weights.
    from safetensors.numpy import load_file

    before, after = load_file(str(ckpt / "model.safetensors")), load_file(str(new_ckpt / "model.safetensors"))
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    state = json.loads((root / "state.json").read_text())
    assert state["rounds"][1]["checkpoint"] == new_ckpt.relative_to(tmp_runs).as_posix()  # relative to runs/
    for r in summary["rounds"]:
        assert 0 <= r["metric"] <= 1 and 1 <= r["avg_exit_layer"] <= 2
    fig2 = summary["figure2"]
    assert len(fig2["before"]["train"]) == 2 and len(fig2["after"]["dev"]) == 2
    assert (root / "figure2_layer_accuracy.png").stat().st_size > 1000
    t1 = summary["table1"]
    assert t1["n"] == 44 and "rho_forgetting" in t1  # 64 rows minus the 20 held out (ceil of 30%)
    # The tiny task is memorized at layer 1 by every instance: a constant, so Spearman is undefined (nan).
    mem_constant = summary["rounds"][0]["exit_hist"] is not None and fig2["before"]["train"][0] == 1.0
    assert np.isnan(t1["rho_loss"]) if mem_constant else -1 <= t1["rho_loss"] <= 1
    # Running the same command again resumes from state.json and trains nothing.
    mtime = (new_ckpt / "model.safetensors").stat().st_mtime
    capsys.readouterr()
    again = cotrain.run(args)
    assert "resuming" in capsys.readouterr().out
    assert (new_ckpt / "model.safetensors").stat().st_mtime == mtime
    assert [r["metric"] for r in again["rounds"]] == [r["metric"] for r in summary["rounds"]]


def test_cotrain_joint_variant_trains_backbone_and_policy(holdout_ckpt, tiny_task, tmp_runs):
    ckpt = holdout_ckpt
    args = cotrain.Args(env=f"cee/{TINY_TASK}-v0", rounds=1, tol=0.0, alpha=0.05, policy_epochs=1, joint=True,
                        backbone_epochs=1, backbone_lr=1e-3, head_lr=1e-3, checkpoint=str(ckpt), name="j")
    summary = cotrain.run(args)
    root = tmp_runs / "cotrain" / "j"
    new_ckpt = root / "round-0" / "backbone"
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    cfg = json.loads((new_ckpt / "train_config.json").read_text())
    assert cfg["objective"] == "joint" and cfg["memorized"].endswith("memorized_train.npy")
    mem = np.load(cfg["memorized"])
    assert len(mem) == 44 and mem.min() >= 1 and mem.max() <= 2
    assert cfg["holdout"] == 0.3, "the backbone stage fits the rows stage 1 fitted: calib stays unseen"
    # The jointly trained policy differs from the round-0 REINFORCE policy it started from.
    from safetensors.numpy import load_file

    p0 = load_file(str(root / "round-0" / "policy" / "policy.safetensors"))
    pj = load_file(str(new_ckpt / "policy" / "policy.safetensors"))
    assert any(not np.allclose(p0[k], pj[k]) for k in ("w1", "w2"))
    assert json.loads((new_ckpt / "policy" / "policy.json").read_text())["joint"] is True
    assert (tmp_runs / "tb" / "stage1" / "j-round-0-backbone").is_dir()  # one TensorBoard run per round


def test_cotrain_stops_on_calib_and_never_reads_dev(holdout_ckpt, tiny_task_files, tmp_runs, tmp_path):
    """The stop rule reads calib: the same run with a scrambled dev file makes the same rounds and stops."""
    from backbones.tasks import task_from_file

    def run(name, dev):
        task_from_file(TINY_TASK, tiny_task_files["train"], text_a="text", label="label", dev_path=dev,
                       label_names=["neg", "pos"])
        args = cotrain.Args(env=f"cee/{TINY_TASK}-v0", rounds=2, tol=0.3, alpha=0.05, policy_epochs=2,
                            backbone_epochs=1, backbone_lr=1e-3, head_lr=1e-3, checkpoint=str(holdout_ckpt), name=name)
        cotrain.run(args)
        return json.loads((tmp_runs / "cotrain" / name / "state.json").read_text())["rounds"]

    header, *rows = tiny_task_files["dev"].read_text().splitlines()
    rng = np.random.default_rng(0)
    scrambled = tmp_path / "dev_scrambled.tsv"  # the same texts with random labels, in another order
    scrambled.write_text("\n".join([header] + [f"{r.split(chr(9))[0]}\t{rng.choice(['neg', 'pos'])}"
                                                 for r in rng.permutation(rows)]) + "\n")
    a, b = run("a", tiny_task_files["dev"]), run("b", scrambled)
    assert len(a) >= 2
    assert [r.get("stop") for r in a] == [r.get("stop") for r in b]
    assert [r["calib"] for r in a] == [r["calib"] for r in b]
    assert [r["dev"]["metric"] for r in a] != [r["dev"]["metric"] for r in b], "dev was scrambled"
    for prev, r in zip(a, a[1:]):
        assert r["change"]["metric"] == abs(r["calib"]["metric"] - prev["calib"]["metric"])
        assert r["change"]["exit_tv"] == cotrain.exit_tv(r["calib"]["exit_hist"], prev["calib"]["exit_hist"])


def test_cotrain_refuses_a_backbone_without_calib_rows(tiny_checkpoint, tiny_task, tmp_runs):
    with pytest.raises(cotrain.UserError, match="held out no calib rows.*--holdout 0.3"):
        cotrain.run(cotrain.Args(env=f"cee/{TINY_TASK}-v0", rounds=1, checkpoint=str(tiny_checkpoint[0]), name="n"))
