"""The backbone stage of co-training: stage-1 training (``backbones.train``) with ConsistentEE's losses.

    python -m agents.rl.backbone_stage --task RTE --init-from CKPT --objective exit --exit-policy POLICY --out DIR
    python -m agents.rl.backbone_stage --task RTE --init-from CKPT --objective joint --exit-policy POLICY \\
        --memorized MEM.npy --out DIR
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m agents.rl.backbone_stage ...

``exit`` is Eq 6: cross-entropy only at the layer where the frozen policy exits.
``joint`` is the paper's joint variant: Eq 6 at the exits the policy samples plus Eq 5
for the policy (hardness reward from the live log-probabilities and the memorized
layers in ``--memorized``), trained together; the policy is saved to ``<out>/policy``.
``agents.cotrain`` runs this stage in every round.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from agents.policies.net import LayerMLPPolicy
from agents.rl.losses import exit_layer_loss, joint_loss
from backbones.cli import UserError, parse, user_errors
from backbones.train import TrainConfig, train


@dataclass
class StageConfig(TrainConfig):
    """Stage-1 training settings plus the co-training stage's; every field is a flag."""

    objective: Literal["exit", "joint"] = "exit"  # type: ignore[assignment]  (TrainConfig's are eq1, last)
    """exit: CE only at the exit the frozen --exit-policy picks (paper Eq 6); joint: Eq 6 at the exits the
    policy samples + Eq 5 for the policy, trained together"""
    exit_policy: str = ""
    """policy folder (policy.safetensors + policy.json)"""
    memorized: str | None = None
    """joint: .npy with the memorized layer (Eq 7, 1..L) of every train instance"""
    reward: str = "hardness"
    """joint: the policy's reward: hardness (Eq 4), vanilla (Eq 3) or hardness_weighted"""
    alpha: float = 0.05
    """joint: depth penalty of the reward"""
    policy_k: int = 8
    """joint: exit trajectories sampled per instance (Eq 5's K; their mean is the baseline)"""
    policy_lr: float = 3e-4
    """joint: peak learning rate of the policy (saved to <out>/policy)"""


class ExitLayerObjective:
    """Eq 6: the frozen policy picks each instance's exit (first pi > 0.5); CE only there."""

    def __init__(self, policy_dir: str) -> None:
        self.net = LayerMLPPolicy.load(policy_dir).requires_grad_(False)
        self.modules: list[torch.nn.Module] = []

    def param_groups(self) -> list[dict]:
        return []

    def check(self, n_train: int) -> None:
        pass

    def loss(self, logits, states, batch):
        return exit_layer_loss(logits, states, batch["labels"], self.net), {}

    def save(self, out: Path, unwrap) -> None:
        pass


class JointObjective:
    """Eq 6 at the exits the policy samples + Eq 5 for the policy, both trained."""

    def __init__(self, c: StageConfig) -> None:
        if not c.memorized:
            raise UserError("--objective joint needs --memorized FILE (.npy of memorized layers of the train set)")
        self.c, self.policy_dir = c, Path(c.exit_policy)
        self.memorized = torch.as_tensor(np.load(c.memorized), dtype=torch.long)
        self.modules = [LayerMLPPolicy.load(c.exit_policy).train()]

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.modules[0].parameters()), "lr": self.c.policy_lr, "weight_decay": 0.0}]

    def check(self, n_train: int) -> None:
        if len(self.memorized) != n_train:
            raise ValueError(f"{self.c.memorized} has {len(self.memorized)} entries; the train set has {n_train}")

    def loss(self, logits, states, batch):
        mem = self.memorized[batch["idx"].cpu()].to(logits.device)
        return joint_loss(logits, states, batch["labels"], mem, self.modules[0], self.c.alpha, self.c.reward,
                          self.c.policy_k)

    def save(self, out: Path, unwrap) -> None:
        from backbones.multiexit import weights_sha256

        start = json.loads((self.policy_dir / "policy.json").read_text())  # its env, reward, task, ...
        # It learned on this stage's training rows together with the new backbone: no row hash of its own, so
        # agents.calibrate refuses it rather than trusting the start policy's record.
        unwrap(self.modules[0]).save(out / "policy", extra={
            **start, "checkpoint": str(out), "checkpoint_sha256": weights_sha256(out), "joint": True,
            "train_split": "train", "learned_on": {"split": "train", "rows_sha256": None}})


def run(c: StageConfig) -> Path:
    """Train the backbone stage; returns the checkpoint directory."""
    if c.objective not in ("exit", "joint"):
        raise UserError(f"--objective must be exit or joint; got {c.objective!r}")
    if not c.exit_policy:
        raise UserError(f"--objective {c.objective} needs --exit-policy DIR (a trained policy folder)")
    objective = ExitLayerObjective(c.exit_policy) if c.objective == "exit" else JointObjective(c)
    return train(c, objective)


@user_errors
def main(argv: list[str] | None = None) -> Path:
    return run(parse(StageConfig, argv, __doc__))


if __name__ == "__main__":
    main()
