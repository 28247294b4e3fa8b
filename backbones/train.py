"""Stage-1 training of a multi-exit encoder (paper Eq 1-2), or a plain last-layer fine-tune.

    python -m backbones.train --task RTE
    python -m backbones.train --task MRPC --objective last
    python -m backbones.train --task RTE --init-from CKPT --objective exit --exit-policy POLICY    # Eq 6
    python -m backbones.train --task RTE --init-from CKPT --objective joint --exit-policy POLICY \
        --memorized MEM.npy                  # Eq 6 + Eq 5 together (the paper's joint variant)
    accelerate launch --multi_gpu --num_processes 2 -m backbones.train --task RTE   # DDP, unchanged
    (on a CPU-only machine: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...)

Writes a checkpoint (safetensors + JSON) under runs/stage1/<name>/, TensorBoard
scalars under runs/tb/stage1/<name>/, per-layer dev metrics to metrics.json, and
the per-epoch correctness of every training instance at every layer (for
forgetting events) to train_correct.npy. Interrupted runs resume from the last
saved step when started again with the same flags.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from backbones import tasks as T
from backbones.data import Encoded, length_grouped_order, model_inputs, run_all_layers
from backbones.multiexit import WEIGHTS_NAME, MultiExitEncoder, default_pooling, load_tokenizer, weighted_exit_loss
from backbones.paths import DEFAULT_ENCODER, resolve_model, runs_dir
from backbones.protocol import Partition, checkpoint_suffix, partition
from backbones.policy_net import LayerMLPPolicy, policy_inputs, reinforce_loss

# Per-task defaults that differ from TrainConfig's (small sets want more epochs; SST-2 is big for 2 cores).
TASK_DEFAULTS: dict[str, dict] = {
    "RTE": {"epochs": 5},  # dev, last layer: 57.0 after 3 epochs, 61.4 after 5 (README, stage 1)
    "MCID": {"epochs": 8},
    "SST2": {"max_train_samples": 8000},
    "StackOverflow": {"max_train_samples": 6000},
}


@dataclass
class TrainConfig:
    task: str = "RTE"
    model: str = DEFAULT_ENCODER
    pooling: str | None = None  # None: mean for sentence-transformers checkpoints, cls otherwise
    objective: str = "eq1"  # eq1 (all exits, w_l = l), last, exit (Eq 6: CE at the frozen policy's exit), joint
    exit_policy: str | None = None  # policy folder (policy.safetensors + policy.json), for objective exit / joint
    memorized: str | None = None  # joint: .npy of each train instance's memorized layer (Eq 7, 1..L)
    reward: str = "hardness"  # joint: the policy's reward (hardness = Eq 4, vanilla = Eq 3, hardness_weighted)
    alpha: float = 0.05  # joint: depth penalty of the reward
    policy_k: int = 8  # joint: trajectories sampled per instance (Eq 5's K; their mean is the baseline)
    policy_lr: float = 3e-4  # joint: peak learning rate of the policy
    init_from: str | None = None  # start from this multi-exit checkpoint instead of the pretrained encoder
    epochs: int | None = None  # None: task default (3)
    batch_size: int = 32
    lr: float = 5e-5  # encoder
    head_lr: float = 5e-4  # internal classifiers and pooler (freshly initialised)
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_length: int = 128
    max_train_samples: int | None = None
    holdout: float = 0.0  # hold out this stratified fraction of train (calib rows); the backbone never sees it
    folds: int = 0  # cross-fitting: split train into this many stratified folds ...
    fold: int = 0  # ... and train on every fold but this one
    seed: int = 0
    data_dir: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    out: str | None = None
    save_every: int = 100  # optimizer steps between resumable saves
    eval_batch_size: int = 64

    def resolved(self) -> "TrainConfig":
        c = TrainConfig(**asdict(self))
        c.task = T.get_task(c.task).name
        for k, v in TASK_DEFAULTS.get(c.task, {}).items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        c.epochs = c.epochs or 3
        if c.init_from:  # architecture comes from the checkpoint
            c.pooling = json.loads((Path(c.init_from) / "multiexit.json").read_text())["pooling"]
        c.pooling = c.pooling or default_pooling(resolve_model(c.model))
        return c


def run_name(c: TrainConfig) -> str:
    tag = Path(c.model.rstrip("/")).name
    return f"{c.task}-{tag}-{c.pooling}-{c.objective}-s{c.seed}" + checkpoint_suffix(c.holdout, c.folds, c.fold)


def checkpoint_dir(c: TrainConfig) -> Path:
    return Path(c.out) if c.out else runs_dir() / "stage1" / run_name(c)


def tb_name(out: Path) -> str:
    """TensorBoard run name: the checkpoint folder's name, or for outputs nested deeper
    under runs/ (runs/cotrain/<run>/round-<r>/backbone) the parts below runs/<kind>/ joined."""
    try:
        rel = Path(out).resolve().relative_to(runs_dir().resolve()).parts
    except ValueError:
        rel = ()
    return "-".join(rel[1:]) if len(rel) > 2 else Path(out).name


def is_complete(ckpt: Path) -> bool:
    return (ckpt / WEIGHTS_NAME).is_file() and (ckpt / "metrics.json").is_file()


def fit_partition(c: TrainConfig, train_ds) -> Partition:
    """The rows of the train split this configuration fits (and the rows it never sees)."""
    return partition(np.asarray(train_ds["label"]), seed=c.seed, max_train_samples=c.max_train_samples,
                     holdout=c.holdout, folds=c.folds, fold=c.fold)


def load_splits(c: TrainConfig):
    tr = T.load_split(c.task, "train", data_dir=c.data_dir, path=c.train_file)
    tr = tr.select(fit_partition(c, tr).fit)
    dev = T.load_split(c.task, "dev", data_dir=c.data_dir, path=c.dev_file)
    test = T.load_split(c.task, "test", data_dir=c.data_dir, path=c.test_file) if c.test_file else None
    return tr, dev, test


def layer_metrics(task: str, logp: np.ndarray, labels: np.ndarray) -> list[float]:
    return [T.compute_metric(task, logp[:, l].argmax(-1), labels) for l in range(logp.shape[1])]


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) and return the checkpoint directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    c = cfg.resolved()
    acc = Accelerator()
    set_seed(c.seed)
    out = checkpoint_dir(c)
    spec = T.get_task(c.task)
    train_ds, dev_ds, test_ds = load_splits(c)  # errors in user data surface before anything is written
    if is_complete(out):
        acc.print(f"{out} is already trained; delete it to train again.")
        return out

    if c.objective in ("exit", "joint") and not c.exit_policy:
        raise ValueError(f"--objective {c.objective} needs --exit-policy DIR (a trained policy folder)")
    memorized = None
    if c.objective == "joint":
        if not c.memorized:
            raise ValueError("--objective joint needs --memorized FILE (.npy of memorized layers of the train set)")
        memorized = torch.as_tensor(np.load(c.memorized), dtype=torch.long)
        if len(memorized) != len(train_ds):
            raise ValueError(f"{c.memorized} has {len(memorized)} entries; the train set has {len(train_ds)}")
    if c.init_from:
        model, tok = MultiExitEncoder.load(c.init_from), load_tokenizer(c.init_from)
        if model.config.num_labels != len(spec.label_names):
            raise ValueError(f"{c.init_from} has {model.config.num_labels} labels; task {c.task} has {len(spec.label_names)}")
    else:
        tok = load_tokenizer(resolve_model(c.model))
        model = MultiExitEncoder.from_pretrained_encoder(
            c.model, len(spec.label_names), pooling=c.pooling, max_length=c.max_length,
            task=c.task, label_names=spec.label_names,
        )
    exit_net = None
    if c.objective == "exit":
        exit_net = LayerMLPPolicy.load(c.exit_policy).requires_grad_(False)
    elif c.objective == "joint":
        exit_net = LayerMLPPolicy.load(c.exit_policy).train()
    enc_train = Encoded(train_ds, tok, c.max_length)
    enc_dev = Encoded(dev_ds, tok, c.max_length)
    steps_per_epoch = math.ceil(len(enc_train) / (c.batch_size * acc.num_processes))
    total = steps_per_epoch * c.epochs
    head_params = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n  # noqa: E731
    enc_named = [(n, p) for n, p in model.named_parameters() if n.startswith("encoder.")]
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in enc_named if not no_decay(n)], "lr": c.lr, "weight_decay": c.weight_decay},
            {"params": [p for n, p in enc_named if no_decay(n)], "lr": c.lr, "weight_decay": 0.0},
            {"params": head_params, "lr": c.head_lr, "weight_decay": 0.0},
            *([{"params": list(exit_net.parameters()), "lr": c.policy_lr, "weight_decay": 0.0}]
              if c.objective == "joint" else []),
        ]
    )
    sched = get_linear_schedule_with_warmup(opt, int(c.warmup * total), total)
    if c.objective == "joint":  # the policy trains too: prepared (DDP-wrapped) so its gradients sync
        model, exit_net, opt, sched = acc.prepare(model, exit_net, opt, sched)
    else:
        model, opt, sched = acc.prepare(model, opt, sched)

    state_dir = out / "state"
    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    correct = np.full((c.epochs, len(enc_train), model_layers(model)), -1, dtype=np.int8)
    if (state_dir / "progress.json").is_file():
        acc.load_state(str(state_dir))
        progress = json.loads((state_dir / "progress.json").read_text())
        correct = np.load(state_dir / "train_correct.npy")
        acc.print(f"resuming {out.name} at epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']}")
    else:
        acc.print(f"training {out.name}: {len(enc_train)} train / {len(enc_dev)} dev instances, "
                  f"{c.epochs} epochs x {steps_per_epoch} steps on {acc.num_processes} process(es)")

    writer = None
    if acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(c), indent=2))
        writer = SummaryWriter(str(runs_dir() / "tb" / "stage1" / tb_name(out)))

    def save_state(epoch: int, step_in_epoch: int, global_step: int) -> None:
        acc.wait_for_everyone()
        acc.save_state(str(state_dir))
        if acc.is_main_process:
            np.save(state_dir / "train_correct.npy", correct)
            tmp = state_dir / "progress.json.tmp"
            tmp.write_text(json.dumps({"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step}))
            os.replace(tmp, state_dir / "progress.json")
        acc.wait_for_everyone()  # no rank runs ahead (and may crash, killing the main one) mid-save

    t0 = time.time()
    step = progress["global_step"]
    for epoch in range(progress["epoch"], c.epochs):
        order = length_grouped_order(enc_train.lengths, c.batch_size * acc.num_processes,
                                     np.random.default_rng(c.seed + epoch))
        dl = acc.prepare_data_loader(enc_train.loader(c.batch_size, indices=order))
        skip = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        if skip:
            dl = acc.skip_first_batches(dl, skip)
        model.train()
        bar = tqdm(dl, total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{c.epochs}",
                   disable=not acc.is_local_main_process)
        for i, batch in enumerate(bar, start=skip):
            if exit_net is None:
                logits = model(**model_inputs(batch))
                loss = weighted_exit_loss(logits, batch["labels"], c.objective)
            elif c.objective == "exit":
                logits, states = model(**model_inputs(batch), return_states=True)
                loss = exit_layer_loss(logits, states, batch["labels"], exit_net)
            else:
                logits, states = model(**model_inputs(batch), return_states=True)
                loss, parts = joint_loss(logits, states, batch["labels"], memorized[batch["idx"].cpu()].to(logits.device),
                                         exit_net, c.alpha, c.reward, c.policy_k)
                if writer is not None:
                    for k_, v_ in parts.items():
                        writer.add_scalar(f"joint/{k_}", v_, step + 1)
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            idx, ok = acc.gather_for_metrics((batch["idx"], logits.argmax(-1) == batch["labels"][:, None]))
            correct[epoch, idx.cpu().numpy()] = ok.cpu().numpy()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if writer is not None:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
            if c.save_every and step % c.save_every == 0 and i + 1 < steps_per_epoch:
                save_state(epoch, i + 1, step)
        dev_logp = run_all_layers(acc.unwrap_model(model), enc_dev, c.eval_batch_size)
        dev_scores = layer_metrics(c.task, dev_logp, enc_dev.labels)
        if writer is not None:
            for l, s in enumerate(dev_scores, 1):
                writer.add_scalar(f"dev/{T.metric_name(c.task)}_layer{l}", s, step)
        acc.print(f"epoch {epoch + 1}: dev {T.metric_name(c.task)} by layer "
                  + " ".join(f"{100 * s:.1f}" for s in dev_scores))
        save_state(epoch + 1, 0, step)

    acc.wait_for_everyone()
    if acc.is_main_process:
        model_ = acc.unwrap_model(model)
        result = evaluate_checkpoint_model(model_, tok, c, dev_ds, test_ds)
        result["wall_time_s"] = round(time.time() - t0, 1)
        result["config"] = asdict(c)
        np.save(out / "train_correct.npy", correct)
        model_.save(out, tok)
        if c.objective == "joint":
            start = json.loads((Path(c.exit_policy) / "policy.json").read_text())  # its env, reward, task, ...
            acc.unwrap_model(exit_net).save(out / "policy", extra={**start, "checkpoint": str(out), "joint": True})
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out / "metrics.json")  # written last: its presence marks the checkpoint complete
        shutil.rmtree(state_dir, ignore_errors=True)
        writer.close()
        print(format_layer_table(result))
        print(f"checkpoint: {out}  ({result['wall_time_s']:.0f} s)")
    acc.wait_for_everyone()
    return out


def _policy_logits(exit_net, states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exit logits [B, L] of the policy on detached live states (and probabilities, if it reads them)."""
    features = getattr(getattr(exit_net, "module", exit_net), "features", "state")
    return exit_net(policy_inputs(states.detach().float(), logits.detach().float().log_softmax(-1), features))


def exit_layer_loss(logits: torch.Tensor, states: torch.Tensor, labels: torch.Tensor, exit_net) -> torch.Tensor:
    """Eq 6: cross-entropy only at the layer where the frozen policy exits (first pi > 0.5, else the last)."""
    with torch.no_grad():
        go = _policy_logits(exit_net, states, logits) > 0  # pi > 0.5
        go[:, -1] = True
        t = go.int().argmax(1)
    return torch.nn.functional.cross_entropy(logits[torch.arange(len(t), device=t.device), t], labels)


def joint_loss(logits: torch.Tensor, states: torch.Tensor, labels: torch.Tensor, memorized: torch.Tensor,
               exit_net, alpha: float, reward: str, k: int) -> tuple[torch.Tensor, dict]:
    """The paper's joint variant: Eq 6 and Eq 5 from one forward pass, both trained.

    K exit trajectories per instance are sampled from the policy on the live (detached)
    states; the classifiers get cross-entropy at each sampled exit layer (Eq 6, averaged
    over the K samples), the policy gets Eq 5 with the reward of that exit computed from
    the live log p_t(y|x) and the instance's memorized layer (the K samples' mean reward
    is the baseline). The forced exit at the last layer is not a decision: its action
    does not enter log pi(tau).
    """
    from cee_env.rewards import exit_reward  # pure numpy; the one definition of Eq 3/4

    B, L, _ = logits.shape
    pl = _policy_logits(exit_net, states, logits).repeat_interleave(k, 0)  # [B*K, L]
    lab = labels.repeat_interleave(k)
    with torch.no_grad():
        act = torch.bernoulli(torch.sigmoid(pl))
        act[:, -1] = 1.0
        t = act.argmax(1)  # first exit, 0-based
        steps = torch.arange(L, device=t.device)
        alive = ((steps[None] <= t[:, None]) & (steps[None] < L - 1)).float()
        logp_y = logits.detach().float().log_softmax(-1).repeat_interleave(k, 0)[torch.arange(B * k), t, lab]
        r = exit_reward(logp_y.cpu().numpy(), t.cpu().numpy() + 1, alpha, reward,
                        memorized.repeat_interleave(k).cpu().numpy(), L)
        r = torch.as_tensor(r, dtype=torch.float32, device=pl.device)
    pol = reinforce_loss(pl.T, act.T, alive.T, r, k)
    ce = torch.nn.functional.cross_entropy(logits.repeat_interleave(k, 0)[torch.arange(B * k), t], lab)
    return ce + pol, {"ce": ce.item(), "policy_loss": pol.item(), "reward": r.mean().item(),
                      "exit_layer": (t + 1).float().mean().item()}


def model_layers(model) -> int:
    return getattr(model, "module", model).num_layers


def evaluate_checkpoint_model(model, tok, c: TrainConfig, dev_ds, test_ds) -> dict:
    result = {"task": c.task, "metric": T.metric_name(c.task), "num_layers": model.num_layers}
    for split, ds in (("dev", dev_ds), ("test", test_ds)):
        if ds is None:
            continue
        enc = Encoded(ds, tok, c.max_length)
        if (enc.labels < 0).any():
            continue  # unlabelled GLUE test file
        logp = run_all_layers(model, enc, c.eval_batch_size)
        preds = logp.argmax(-1)
        result[split] = {
            "layer_metric": layer_metrics(c.task, logp, enc.labels),
            "layer_distinct_predictions": [int(len(np.unique(preds[:, l]))) for l in range(preds.shape[1])],
            "n": len(enc),
        }
    return result


def format_layer_table(result: dict) -> str:
    n = result["num_layers"]
    lines = [f"{result['task']} {result['metric']} by exit layer", "split " + " ".join(f"{l:>6d}" for l in range(1, n + 1))]
    for split in ("dev", "test"):
        if split in result:
            lines.append(f"{split:<5} " + " ".join(f"{100 * s:6.1f}" for s in result[split]["layer_metric"]))
    return "\n".join(lines)


def ensure_checkpoint(task: str, **overrides) -> Path:
    """The stage-1 checkpoint for ``task`` with these settings; trained first if missing."""
    c = TrainConfig(task=task, **{k: v for k, v in overrides.items() if v is not None})
    ckpt = checkpoint_dir(c.resolved())
    if not is_complete(ckpt):
        print(f"No stage-1 checkpoint at {ckpt}: training it now (Eq 1, {c.resolved().epochs} epochs). "
              "This runs once; later runs reuse it.")
        train(c)
    return ckpt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {
        "task": f"task name ({', '.join(T.TASKS)})",
        "model": "encoder: the packaged all-MiniLM-L6-v2 by default, or any BERT-family local path / hub name",
        "pooling": "state the exits read: mean (masked mean of tokens) or cls ([CLS] through a shared pooler); "
                   "default mean for sentence-transformers checkpoints, cls otherwise",
        "objective": "eq1: weighted CE over all exits (paper Eq 1-2); last: plain fine-tune of the last layer; "
                     "exit: CE only at the exit the frozen --exit-policy picks (paper Eq 6); "
                     "joint: Eq 6 at the exits the policy samples + Eq 5 for the policy, trained together",
        "exit_policy": "policy folder (policy.safetensors + policy.json) for --objective exit/joint",
        "memorized": "joint: .npy with the memorized layer (Eq 7, 1..L) of every train instance",
        "reward": "joint: the policy's reward: hardness (Eq 4), vanilla (Eq 3) or hardness_weighted",
        "alpha": "joint: depth penalty of the reward",
        "policy_k": "joint: exit trajectories sampled per instance (Eq 5's K)",
        "policy_lr": "joint: peak learning rate of the policy (saved to <out>/policy)",
        "init_from": "start from this multi-exit checkpoint (e.g. the stage-1 one) instead of the pretrained encoder",
        "epochs": "training epochs (default 3; RTE 5, MCID 8)",
        "batch_size": "training batch size per process",
        "lr": "peak learning rate of the encoder",
        "head_lr": "peak learning rate of the internal classifiers and pooler",
        "weight_decay": "AdamW weight decay of encoder weights",
        "warmup": "fraction of steps with linear warm-up (then linear decay to 0)",
        "max_length": "maximum tokens per instance (pairs are truncated longest-first)",
        "max_train_samples": "train on a random subset of this size (SST2 default 8000, StackOverflow 6000; 0 = all)",
        "holdout": "hold out this stratified fraction of the train split (calib rows, never trained on); "
                   "0 = train on all of it",
        "folds": "cross-fitting: split the train split into this many stratified folds (0 = off) ...",
        "fold": "... and train on every fold but this one (0-based)",
        "seed": "random seed (data order, initialisation, subsets and folds)",
        "data_dir": "data directory (default $CEE_DATA_DIR or ../shared/data)",
        "train_file": "train file path, overriding the task's (same format)",
        "dev_file": "dev file path, overriding the task's",
        "test_file": "labelled test file of the task's format; scored at the end",
        "out": "checkpoint directory (default runs/stage1/<task>-<model>-<pooling>-<objective>-s<seed>)",
        "save_every": "optimizer steps between resumable saves (0: only at epoch ends)",
        "eval_batch_size": "batch size for evaluation",
    }
    for f in fields(TrainConfig):
        typ = {int: int, float: float}.get(type(f.default), str)
        if f.name in ("epochs", "max_train_samples"):
            typ = int
        kw = {"choices": ["eq1", "last", "exit", "joint"]} if f.name == "objective" else {}
        if f.name == "pooling":
            kw = {"choices": ["mean", "cls"]}
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default, help=helps[f.name], **kw)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    train(TrainConfig(**vars(args)))


if __name__ == "__main__":
    main()
