import json

import numpy as np
import torch

from agents import cotrain
from backbones.train import exit_layer_loss
from tests.conftest import TINY_TASK


class _FixedExit(torch.nn.Module):
    """A stand-in exit network: exits at a fixed 0-based layer per instance."""

    def __init__(self, exits, num_layers):
        super().__init__()
        self.exits, self.L = torch.as_tensor(exits), num_layers

    def all_layer_logits(self, states):
        logits = torch.full((states.shape[0], self.L), -5.0)
        logits[torch.arange(states.shape[0]), self.exits] = 5.0
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
    net.all_layer_logits = lambda s: torch.full((2, 3), -1.0)  # pi < 0.5 everywhere
    loss = exit_layer_loss(logits, torch.zeros(2, 3, 4), torch.tensor([1, 0]), net)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits[:, -1], torch.tensor([1, 0])))


def test_cotrain_round_trip_and_resume(tiny_checkpoint, tiny_task, tmp_runs, capsys):
    ckpt, _ = tiny_checkpoint
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
    assert state["rounds"][1]["checkpoint"] == str(new_ckpt)
    for r in summary["rounds"]:
        assert 0 <= r["metric"] <= 1 and 1 <= r["avg_exit_layer"] <= 2
    fig2 = summary["figure2"]
    assert len(fig2["before"]["train"]) == 2 and len(fig2["after"]["dev"]) == 2
    assert (root / "figure2_layer_accuracy.png").stat().st_size > 1000
    t1 = summary["table1"]
    assert t1["n"] == 64 and "rho_forgetting" in t1
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
