"""Stage-1 training of a multi-exit encoder (paper Eq 1-2), or a plain last-layer fine-tune.

    python -m backbones.train --task RTE
    python -m backbones.train --task MRPC --objective last
    python -m backbones.train --task RTE --holdout 0.3     # keep 30% of train out of stage 1 (calib rows)
    python -m backbones.train --task-file my_task.toml     # your own task (backbones.tasks.load_task_file)
    accelerate launch --multi_gpu --num_processes 2 -m backbones.train --task RTE   # DDP, unchanged
    (on a CPU-only machine: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...)

Writes a checkpoint (safetensors + JSON) under runs/stage1/<name>/, TensorBoard
scalars under runs/tb/stage1/<name>/, per-layer dev metrics to metrics.json, and
the per-epoch correctness of every training instance at every layer (for
forgetting events) to train_correct.npy. Interrupted runs resume from the last
saved step when started again with the same flags.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from backbones import tasks as T
from backbones.cli import UserError, one_line, parse, user_errors
from backbones.data import Encoded, length_grouped_order, model_inputs, run_all_layers
from backbones.files import claim, read_json, save_npy, summary_writer, write_json
from backbones.multiexit import (WEIGHTS_NAME, MultiExitEncoder, default_pooling, load_tokenizer, resolve_device,
                                 weighted_exit_loss)
from backbones.paths import DEFAULT_ENCODER, resolve_model, runs_dir
from backbones.paths import data_dir as data_dir_of
from backbones.protocol import Partition, checkpoint_suffix, partition

# Per-task defaults that differ from TrainConfig's (small sets want more epochs; SST-2 is big for 2 cores).
TASK_DEFAULTS: dict[str, dict] = {
    "RTE": {"epochs": 5},  # dev, last layer: 57.0 after 3 epochs, 61.4 after 5 (README, stage 1)
    "MCID": {"epochs": 8},
    "SST2": {"max_train_samples": 8000},
    "StackOverflow": {"max_train_samples": 6000},
}


class Objective(Protocol):
    """A training loss other than Eq 1 / last-layer CE (the co-training stage brings Eq 6 and the
    joint variant, :mod:`agents.rl.backbone_stage`). It may train modules of its own alongside the model."""

    modules: list[torch.nn.Module]  # trained with the model; replaced by their prepared (DDP) forms

    def param_groups(self) -> list[dict]:
        """Optimizer groups of ``modules``."""

    def check(self, n_train: int) -> None:
        """Raise a clear error if the objective does not fit a train split of ``n_train`` rows."""

    def loss(self, logits: torch.Tensor, states: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss of a batch from all exits' logits [B, L, C] and pooled states [B, L, H]; scalars to log."""

    def save(self, out: Path, unwrap) -> None:
        """Write what the objective trained (e.g. the policy) next to the checkpoint."""


@dataclass
class TrainConfig:
    """Stage-1 training settings; every field is a flag of ``python -m backbones.train``."""

    task: str = "RTE"
    """task name: RTE, MRPC, SST2, QNLI, MCID, StackOverflow, or a user task (see --task-file)"""
    task_file: str | None = None
    """a JSON or TOML file describing your own task (name, train/dev/test files, columns, labels, metric;
    see backbones.tasks.load_task_file); it replaces --task"""
    model: str = DEFAULT_ENCODER
    """backbone: the packaged all-MiniLM-L6-v2 (6 layers) by default; all-mpnet-base-v2 (12 layers, the mpnet extra);
    smollm2 (the packaged 30-layer SmolLM2-135M decoder); or a local path / hub name of any BERT, RoBERTa, ELECTRA,
    DistilBERT, MPNet, DeBERTa-v2 or Llama-family model"""
    pooling: Literal["mean", "cls", "last"] | None = None
    """state the exits read: mean (masked mean of tokens), cls ([CLS] through a shared pooler) or last (a decoder's
    last token after its final norm); None: last for decoders, mean for sentence-transformers checkpoints, else cls"""
    objective: Literal["eq1", "last"] = "eq1"  # other names come with an Objective (train(cfg, objective=...))
    """eq1: weighted CE over all exits (paper Eq 1-2, w_l = l); last: plain fine-tune of the last layer
    (Eq 6 and the joint variant: python -m agents.rl.backbone_stage)"""
    init_from: str | None = None
    """start from this multi-exit checkpoint (e.g. the stage-1 one) instead of the pretrained encoder"""
    epochs: int | None = None
    """training epochs; None: the task's default (3; RTE 5, MCID 8)"""
    batch_size: int = 32
    """training batch size per process"""
    lr: float = 5e-5
    """peak learning rate of the encoder"""
    head_lr: float = 5e-4
    """peak learning rate of the internal classifiers and pooler (freshly initialised)"""
    weight_decay: float = 0.01
    """AdamW weight decay of encoder weights"""
    warmup: float = 0.1
    """fraction of steps with linear warm-up (then linear decay to 0)"""
    max_length: int = 128
    """maximum tokens per instance (pairs are truncated longest-first)"""
    max_train_samples: int | None = None
    """train on a random subset of this size; None: the task's default (SST2 8000, StackOverflow 6000,
    else all); 0: all"""
    holdout: float = 0.0
    """hold out this stratified fraction of the train split (calib rows, never trained on); 0: train on all"""
    folds: int = 0
    """cross-fitting: split the train split into this many stratified folds (0: off) ..."""
    fold: int = 0
    """... and train on every fold but this one (0-based)"""
    seed: int = 0
    """random seed (data order, initialisation, subsets and folds)"""
    data_dir: str | None = None
    """data directory; None: $CEE_DATA_DIR or ../shared/data"""
    train_file: str | None = None
    """train file path, overriding the task's (same format)"""
    dev_file: str | None = None
    """dev file path, overriding the task's"""
    test_file: str | None = None
    """labelled test file of the task's format; scored at the end"""
    out: str | None = None
    """checkpoint directory; None: runs/stage1/<task>-<model>-<pooling>-<objective>-s<seed>"""
    save_every: int = 100
    """optimizer steps between resumable saves (0: only at epoch ends)"""
    eval_batch_size: int = 64
    """batch size for evaluation"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when torch sees a GPU (under accelerate launch, one per process), else the CPU"""

    def check(self) -> None:
        """Raise a :class:`~backbones.cli.UserError` naming the flag of the first value out of range."""
        checks = [
            (self.epochs is None or self.epochs >= 1, "--epochs must be >= 1", self.epochs),
            (self.batch_size >= 1, "--batch-size must be >= 1", self.batch_size),
            (self.eval_batch_size >= 1, "--eval-batch-size must be >= 1", self.eval_batch_size),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a finite number > 0", self.lr),
            (self.head_lr > 0 and math.isfinite(self.head_lr), "--head-lr must be a finite number > 0", self.head_lr),
            (0 <= self.holdout < 1, "--holdout must be in [0, 1)", self.holdout),
            (self.folds == 0 or self.folds >= 2, "--folds must be 0 (off) or >= 2", self.folds),
            (0 <= self.fold < max(self.folds, 1),
             f"--fold must be in 0..{self.folds - 1}" if self.folds else "--fold needs --folds", self.fold),
            (not (self.holdout and self.folds), "--holdout and --folds exclude each other; give one",
             (self.holdout, self.folds)),
        ]
        for ok, msg, got in checks:
            if not ok:
                raise UserError(f"{msg}; got {got}")

    def resolved(self) -> "TrainConfig":
        """A copy with the defaults filled in: the task's name (and registration, for --task-file), the
        task's defaults, the pooling. Raises a user error for values out of range."""
        self.check()
        c = replace(self)
        c.task = T.load_task_file(c.task_file).name if c.task_file else T.get_task(c.task).name
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
    groups = "-textgroups" if T.get_task(c.task).group_by_text else ""  # its rows are split by text group
    return f"{c.task}-{tag}-{c.pooling}-{c.objective}-s{c.seed}{groups}" + checkpoint_suffix(c.holdout, c.folds, c.fold)


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
    try:
        return partition(np.asarray(train_ds["label"]), seed=c.seed, max_train_samples=c.max_train_samples,
                         holdout=c.holdout, folds=c.folds, fold=c.fold,
                         texts=T.get_task(c.task).partition_texts(train_ds))
    except ValueError as e:
        raise ValueError(f"task {c.task} ({c.train_file or 'its train file'}): {e}") from None


def fit_rows(c: TrainConfig):
    """The training rows configuration ``c`` fits (its train file, minus what the partition holds out)."""
    tr = T.load_split(c.task, "train", data_dir=c.data_dir, path=c.train_file)
    return tr.select(fit_partition(c, tr).fit)


def train_file_name(task: str, data_dir: str | None, train_file: str | None) -> str:
    """The train file a task's rows are read from (for messages)."""
    if train_file:
        return str(train_file)
    rel = T.get_task(task).splits.get("train", "")
    try:
        return rel if Path(rel).is_absolute() else str(data_dir_of(data_dir) / rel)
    except FileNotFoundError:
        return rel


def load_splits(c: TrainConfig):
    tr = fit_rows(c)
    dev = T.load_split(c.task, "dev", data_dir=c.data_dir, path=c.dev_file)
    test = T.load_split(c.task, "test", data_dir=c.data_dir, path=c.test_file) if c.test_file else None
    return tr, dev, test


def layer_metrics(task: str, logp: np.ndarray, labels: np.ndarray) -> list[float]:
    return [T.compute_metric(task, logp[:, l].argmax(-1), labels) for l in range(logp.shape[1])]


# TrainConfig fields that do not change the weights: where files are read from or written to, how often
# progress is saved, the evaluation batch size, files only scored. The train rows are compared by content.
NOT_TRAINING = ("data_dir", "task_file", "train_file", "dev_file", "test_file", "out", "save_every",
                "eval_batch_size", "device")
STATE, PENDING_STATE = "state", "state.new"


def train(cfg: TrainConfig, objective: Objective | None = None) -> Path:
    """Train (or resume) and return the checkpoint directory.

    Without ``objective`` the loss is Eq 1 (``cfg.objective="eq1"``) or the last layer's CE. The
    process claims the checkpoint folder (:func:`backbones.files.claim`): another one training the
    same checkpoint makes it wait, then find it trained. An interrupted run resumes only with the
    same settings and training rows; a complete checkpoint is reused only with the same settings
    (otherwise a :class:`~backbones.cli.UserError` names the differing fields); a complete one whose
    metrics.json was deleted gets it back by evaluating its (checked) weights, without retraining.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    c = cfg.resolved()
    try:
        dev = resolve_device(c.device)
    except ValueError as e:
        raise UserError(f"--device: {e}") from e
    acc = Accelerator(cpu=dev.type == "cpu")
    set_seed(c.seed)
    out = checkpoint_dir(c)
    splits = load_splits(c)  # errors in user data surface before anything is written
    with claim(out, f"the checkpoint {out}") if acc.is_main_process else nullcontext():
        acc.wait_for_everyone()  # other ranks wait while the main one waits for the folder
        return _train(c, acc, out, splits, objective)


def _train(c: TrainConfig, acc, out: Path, splits, objective: Objective | None) -> Path:
    from transformers import get_linear_schedule_with_warmup

    spec = T.get_task(c.task)
    train_ds, dev_ds, test_ds = splits
    data_sha = rows_sha256(train_ds)
    if is_complete(out):
        check_same_training(out, c, data_sha)
        acc.print(f"{out} is already trained; delete it to train again.")
        return out
    state_dir = out / STATE
    if acc.is_main_process and not (state_dir / "progress.json").is_file() \
            and (out / PENDING_STATE / "progress.json").is_file():  # interrupted between writing and renaming
        shutil.rmtree(state_dir, ignore_errors=True)
        os.replace(out / PENDING_STATE, state_dir)
    acc.wait_for_everyone()
    resuming = (state_dir / "progress.json").is_file()
    if resuming:
        check_same_training(out, c, data_sha, interrupted=True)
    elif (out / WEIGHTS_NAME).is_file() and (out / "train_config.json").is_file():
        check_same_training(out, c, None)
        if acc.is_main_process:
            rebuild_metrics(out, c, dev_ds, test_ds)
        acc.wait_for_everyone()
        return out

    if objective is None and c.objective not in ("eq1", "last"):
        raise ValueError(f"objective {c.objective!r} needs an Objective (train(cfg, objective=...)); "
                         "the stage-1 objectives are eq1 and last")
    if objective is not None:
        objective.check(len(train_ds))
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
            *(objective.param_groups() if objective is not None else []),
        ]
    )
    sched = get_linear_schedule_with_warmup(opt, int(c.warmup * total), total)
    extra = objective.modules if objective is not None else []
    model, *extra, opt, sched = acc.prepare(model, *extra, opt, sched)  # an objective's modules train (DDP) too
    if objective is not None:
        objective.modules = extra

    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    correct = np.full((c.epochs, len(enc_train), model_layers(model)), -1, dtype=np.int8)
    if resuming:
        progress, correct = load_progress(acc, state_dir, correct.shape)
        acc.print(f"resuming {out.name} at epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']}")
    else:
        acc.print(f"training {out.name}: {len(enc_train)} train / {len(enc_dev)} dev instances, "
                  f"{c.epochs} epochs x {steps_per_epoch} steps on {acc.num_processes} process(es)")

    writer = None
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", asdict(c), indent=2)
        writer = summary_writer(runs_dir() / "tb" / "stage1" / tb_name(out))

    def save_state(epoch: int, step_in_epoch: int, global_step: int) -> None:
        """Write the state to state.new/ (progress.json last), then swap it for state/: an interruption
        mid-save leaves the previous state/ whole."""
        pending = out / PENDING_STATE
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(pending, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(pending))
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_npy(pending / "train_correct.npy", correct)
            write_json(pending / "progress.json", {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                                   "global_step": global_step, "train_rows_sha256": data_sha})
            shutil.rmtree(state_dir, ignore_errors=True)
            os.replace(pending, state_dir)
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
            if objective is None:
                logits = model(**model_inputs(batch))
                loss = weighted_exit_loss(logits, batch["labels"], c.objective)
            else:
                logits, states = model(**model_inputs(batch), return_states=True)
                loss, parts = objective.loss(logits, states, batch)
                if writer is not None:
                    for k_, v_ in parts.items():
                        writer.add_scalar(f"{c.objective}/{k_}", v_, step + 1)
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
        result["train_rows_sha256"] = data_sha
        save_npy(out / "train_correct.npy", correct)
        model_.save(out, tok)
        if objective is not None:
            objective.save(out, acc.unwrap_model)
        write_json(out / "metrics.json", result, indent=2)  # written last: its presence marks the checkpoint complete
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(out / PENDING_STATE, ignore_errors=True)
        writer.close()
        print(format_layer_table(result))
        print(f"checkpoint: {out}  ({result['wall_time_s']:.0f} s)")
    acc.wait_for_everyone()
    return out


def rows_sha256(ds) -> str:
    """sha256 of the training rows (texts and labels, in order): the data a checkpoint was fitted on."""
    h = hashlib.sha256()
    for col in ("text_a", "text_b", "label"):
        h.update(json.dumps(list(ds[col])).encode())
    return h.hexdigest()


def check_fit_rows(ckpt: Path, fit_ds, source: str) -> None:
    """Raise a :class:`UserError` if ``ckpt`` recorded that it was fitted on other rows than ``fit_ds``: the
    train file ``source`` changed since (its calib rows may then hold rows the backbone trained on)."""
    try:
        recorded = json.loads((Path(ckpt) / "metrics.json").read_text()).get("train_rows_sha256")
    except (OSError, ValueError):
        return  # no record to compare (a checkpoint from elsewhere): nothing is known
    if recorded is not None and recorded != rows_sha256(fit_ds):
        raise UserError(f"{ckpt} was trained on other rows than {source} gives now (the file changed, or its "
                        "rows moved); its calib rows could hold rows it trained on. Restore that file, or train a "
                        f"new backbone: delete {ckpt} (or pass another --checkpoint)")


def config_diff(saved: dict, c: TrainConfig) -> list[str]:
    """``field saved -> asked`` for every field that changes training (a field the saved config
    predates is not compared)."""
    now = asdict(c)
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items()
            if k not in NOT_TRAINING and k in saved and saved[k] != v]


def check_same_training(out: Path, c: TrainConfig, data_sha: str | None, interrupted: bool = False) -> None:
    """Raise a :class:`UserError` if the run in ``out`` was made with other settings (train_config.json)
    or, when ``data_sha`` is given and the run recorded one, on other training rows."""
    what = f"{out} holds an interrupted run" if interrupted else f"{out} is a checkpoint trained"
    again = (f"rerun with its settings to resume it, or start over: delete {out} or pass --out NEW_DIR"
             if interrupted else f"give its settings to reuse it, or train another: delete {out} or pass --out NEW_DIR")
    cfg_file = out / "train_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{what} without train_config.json, so what it was trained with is unknown; "
                        f"delete {out} or pass --out NEW_DIR")
    saved = read_json(cfg_file, f"delete {out} or pass --out NEW_DIR")
    diff = config_diff(saved, c)
    if data_sha is not None:
        rec = out / (f"{STATE}/progress.json" if interrupted else "metrics.json")
        try:
            recorded = json.loads(rec.read_text()).get("train_rows_sha256")
        except (OSError, ValueError):
            recorded = None  # a damaged progress.json is reported when it is loaded
        if recorded is not None and recorded != data_sha:
            diff.append(f"training rows (the content of {train_file_name(c.task, c.data_dir, c.train_file)}, "
                        "or the subset/holdout/fold taken from it)")
    if diff:
        raise UserError(f"{what} with other settings: {'; '.join(diff)}; {again}")


def load_progress(acc, state_dir: Path, shape: tuple) -> tuple[dict, np.ndarray]:
    """progress.json, the per-instance correctness so far and accelerate's state of an interrupted run;
    a damaged state/ is a :class:`UserError` saying how to recover."""
    try:
        progress = json.loads((state_dir / "progress.json").read_text())
        progress = {k: int(progress[k]) for k in ("epoch", "step_in_epoch", "global_step")}
        correct = np.load(state_dir / "train_correct.npy")
        if correct.shape != shape:
            raise ValueError(f"train_correct.npy is {correct.shape}, expected {shape}")
        acc.load_state(str(state_dir))
    except Exception as e:  # noqa: BLE001 - whatever is wrong, the remedy is the same
        raise UserError(f"{state_dir}, the saved progress of an interrupted run, is damaged ({one_line(e)}); "
                        f"delete {state_dir} to train {state_dir.parent.name} from the start "
                        "(or delete the whole folder)") from e
    return progress, correct


def rebuild_metrics(out: Path, c: TrainConfig, dev_ds, test_ds) -> None:
    """A complete checkpoint whose metrics.json went missing: evaluate its weights (checked against their
    sha256) on dev (and test) and write metrics.json again, instead of retraining."""
    print(f"{out}: metrics.json is missing but the weights are there; evaluating them to rebuild it "
          "(no retraining; delete the folder to train again)")
    model = MultiExitEncoder.load(out)
    result = evaluate_checkpoint_model(model, load_tokenizer(out), c, dev_ds, test_ds)
    result.update(wall_time_s=None, config=asdict(c), train_rows_sha256=None,
                  rebuilt="metrics.json was rebuilt by evaluating the saved weights")
    write_json(out / "metrics.json", result, indent=2)
    print(format_layer_table(result))


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
    """The stage-1 checkpoint for ``task`` with these settings; trained first if missing (or waited for,
    when another process is training it). A complete checkpoint in that folder trained with other
    settings is refused (:class:`UserError`), never reused."""
    try:
        return trained_checkpoint(task, **overrides)
    except FileNotFoundError:
        pass
    c = TrainConfig(task=task, **{k: v for k, v in overrides.items() if v is not None})
    r = c.resolved()
    ckpt = checkpoint_dir(r)
    if not (ckpt / WEIGHTS_NAME).is_file():  # (with weights but no metrics.json, train() says what it does)
        print(f"No stage-1 checkpoint at {ckpt}: training it now (Eq 1, {r.epochs} epochs). "
              "This runs once; later runs reuse it.")
    train(c)
    return ckpt


def trained_checkpoint(task: str, **overrides) -> Path:
    """The complete stage-1 checkpoint for ``task`` with these settings; ``FileNotFoundError`` naming the command
    that trains it when there is none (what :func:`ensure_checkpoint` would train)."""
    r = TrainConfig(task=task, **{k: v for k, v in overrides.items() if v is not None}).resolved()
    ckpt = checkpoint_dir(r)
    if not is_complete(ckpt):
        flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items() if v is not None)
        raise FileNotFoundError(f"no trained stage-1 checkpoint at {ckpt}; train it with "
                                f"`python -m backbones.train --task {task}{flags}`")
    check_same_training(ckpt, r, rows_sha256(fit_rows(r)))  # other settings or other training rows: UserError
    return ckpt


@user_errors
def main(argv: list[str] | None = None) -> Path:
    return train(parse(TrainConfig, argv, __doc__))


if __name__ == "__main__":
    main()
