"""Tests for backbones.multiexit and backbones.train on a tiny 2-layer BERT (hidden 32); see conftest.py."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import N_DEV, N_TRAIN, TINY_TASK, TINY_TRAIN, make_rows

import backbones.train as tr
from backbones import tasks as T
from backbones.data import Encoded, run_all_layers
from backbones.paths import REPO_ROOT
from backbones.multiexit import (
    CONFIG_NAME, WEIGHTS_NAME, MultiExitConfig, MultiExitEncoder, load_tokenizer, weighted_exit_loss,
)

TEXTS_A = ["the good movie", "a very bad plot and it was quite bad", "this", "good"]
TEXTS_B = ["it is good", "the actor", "a scene and the story was very good", "bad"]


def tiny_batch(tok, pairs: bool = True):
    b = tok(TEXTS_A, TEXTS_B if pairs else None, padding=True, return_tensors="pt")
    assert (b["attention_mask"] == 0).any(), "the batch must contain padding"
    return dict(b)


# --------------------------------------------------------------------------- layer by layer
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_layer_by_layer_equals_hf_hidden_states(pooling, attn, tiny_bert_config, tiny_tokenizer):
    from transformers import BertModel

    torch.manual_seed(0)
    cfg = copy.deepcopy(tiny_bert_config)
    cfg._attn_implementation = attn
    ref = BertModel(cfg).eval()
    m = MultiExitEncoder(MultiExitConfig(model="<config>", num_labels=3, pooling=pooling), copy.deepcopy(ref)).eval()
    assert m.num_layers == 2 and len(m.heads) == 2 and m.encoder.pooler is None
    batch = tiny_batch(tiny_tokenizer)
    am = batch["attention_mask"]
    with torch.no_grad():
        out = ref(**batch, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == m.num_layers + 1

        hidden, mask = m.embed(batch["input_ids"], am, batch["token_type_ids"])
        torch.testing.assert_close(hidden, hs[0], rtol=0, atol=1e-6)
        for l in range(m.num_layers):
            hidden = m.run_layer(l, hidden, mask)
            torch.testing.assert_close(hidden, hs[l + 1], rtol=1e-5, atol=1e-5)  # every position, pads included
        torch.testing.assert_close(hidden, out.last_hidden_state, rtol=1e-5, atol=1e-5)

        logits, states = m(**batch, return_states=True)
        assert logits.shape == (4, 2, 3) and states.shape == (4, 2, 32)
        for l in range(m.num_layers):
            h = hs[l + 1]
            if pooling == "mean":
                w = am.unsqueeze(-1).float()
                want = (h * w).sum(1) / w.sum(1)
            else:  # the shared pooler starts as the checkpoint's own pooler
                want = ref.pooler(h)
            torch.testing.assert_close(states[:, l], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits[:, l], m.classify(l, states[:, l]), rtol=0, atol=0)
        if pooling == "cls":
            torch.testing.assert_close(states[:, -1], out.pooler_output, rtol=1e-5, atol=1e-5)

        # padding does not leak into the states: each instance alone (no padding) gives the same s_l
        for i in range(len(TEXTS_A)):
            one = dict(tiny_tokenizer(TEXTS_A[i], TEXTS_B[i], return_tensors="pt"))
            lg1, st1 = m(**one, return_states=True)
            torch.testing.assert_close(st1[0], states[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lg1[0], logits[i], rtol=1e-5, atol=1e-5)


def test_single_sentences_without_token_type_ids(tiny_bert_config, tiny_tokenizer):
    torch.manual_seed(0)
    m = MultiExitEncoder.from_encoder_config(tiny_bert_config, 2, pooling="mean").eval()
    b = tiny_batch(tiny_tokenizer, pairs=False)
    with torch.no_grad():
        with_tt = m(**b)
        without = m(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(with_tt, without)  # token type 0 is the default


def test_from_encoder_config_and_bad_pooling(tiny_bert_config):
    m = MultiExitEncoder.from_encoder_config(tiny_bert_config, 5, pooling="cls")
    assert m.num_layers == 2 and m.config.num_labels == 5 and m.config.pooling == "cls"
    assert [h[1].out_features for h in m.heads] == [5, 5] and m.pooler is not None
    assert MultiExitEncoder.from_encoder_config(tiny_bert_config, 2, pooling="mean").pooler is None
    with pytest.raises(ValueError, match="pooling"):
        MultiExitEncoder.from_encoder_config(tiny_bert_config, 2, pooling="max")
    with pytest.raises(ValueError, match="no multi-exit adapter"):
        MultiExitEncoder(MultiExitConfig(model="x", num_labels=2), torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- loss
def test_weighted_exit_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 2, 0])
    ce = [float(-torch.log_softmax(logits[:, l], -1)[torch.arange(5), labels].mean()) for l in range(3)]
    eq1 = (1 * ce[0] + 2 * ce[1] + 3 * ce[2]) / (1 + 2 + 3)
    assert weighted_exit_loss(logits, labels, "eq1").item() == pytest.approx(eq1, rel=1e-6)
    assert weighted_exit_loss(logits, labels).item() == pytest.approx(eq1, rel=1e-6)  # eq1 is the default
    assert weighted_exit_loss(logits, labels, "last").item() == pytest.approx(ce[2], rel=1e-6)
    with pytest.raises(ValueError, match="objective"):
        weighted_exit_loss(logits, labels, "sum")


def test_last_objective_gives_lower_exits_zero_gradient():
    logits = torch.randn(4, 3, 2, requires_grad=True)
    weighted_exit_loss(logits, torch.tensor([0, 1, 1, 0]), "last").backward()
    assert torch.all(logits.grad[:, :2] == 0) and torch.any(logits.grad[:, 2] != 0)


# --------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_save_load_round_trip(pooling, tmp_path, tiny_bert_config, tiny_tokenizer):
    torch.manual_seed(0)
    m = MultiExitEncoder.from_encoder_config(tiny_bert_config, 3, pooling=pooling, task="X",
                                             label_names=("a", "b", "c"), max_length=40).eval()
    m.save(tmp_path / "ck", tiny_tokenizer)
    files = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {WEIGHTS_NAME, CONFIG_NAME, "encoder", "tokenizer"} <= files
    assert not any(".tmp" in f for f in files)
    m2 = MultiExitEncoder.load(tmp_path / "ck")
    assert not m2.training and m2.config == m.config
    assert m2.config.label_names == ("a", "b", "c")
    b = tiny_batch(tiny_tokenizer)
    with torch.no_grad():
        a, sa = m(**b, return_states=True)
        c, sc = m2(**b, return_states=True)
    assert torch.equal(a, c) and torch.equal(sa, sc)
    tok2 = load_tokenizer(tmp_path / "ck")
    assert tok2(TEXTS_A)["input_ids"] == tiny_tokenizer(TEXTS_A)["input_ids"]


def test_load_of_non_checkpoint_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        MultiExitEncoder.load(tmp_path)


# --------------------------------------------------------------------------- training
def test_train_writes_complete_checkpoint(tiny_checkpoint, tiny_task):
    out, _ = tiny_checkpoint
    assert tr.is_complete(out)
    for name in (WEIGHTS_NAME, CONFIG_NAME, "metrics.json", "train_correct.npy", "train_config.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer").is_dir() and (out / "encoder" / "config.json").is_file()
    assert not (out / "state").exists(), "resumable state is removed once training is complete"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == TINY_TASK and metrics["metric"] == "accuracy" and metrics["num_layers"] == 2
    assert metrics["config"]["pooling"] == "cls"  # a plain BERT folder (no modules.json) defaults to cls
    dev = metrics["dev"]
    assert dev["n"] == N_DEV and len(dev["layer_metric"]) == 2 and len(dev["layer_distinct_predictions"]) == 2
    assert "test" not in metrics  # no test file given
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["task"] == TINY_TASK and cfg["label_names"] == ["neg", "pos"] and cfg["num_labels"] == 2

    correct = np.load(out / "train_correct.npy")
    assert correct.shape == (TINY_TRAIN["epochs"], N_TRAIN, 2) and correct.dtype == np.int8
    assert set(np.unique(correct)) <= {0, 1}, "every instance is recorded in every epoch"

    # the saved weights are the ones that were scored
    model = MultiExitEncoder.load(out)
    enc = Encoded(T.load_split(TINY_TASK, "dev"), load_tokenizer(out), cfg["max_length"])
    logp = run_all_layers(model, enc, batch_size=16)
    assert logp.shape == (N_DEV, 2, 2)
    np.testing.assert_allclose(tr.layer_metrics(TINY_TASK, logp, enc.labels), dev["layer_metric"])


def test_train_learns_the_tiny_task(tiny_checkpoint):
    out, losses = tiny_checkpoint
    steps = N_TRAIN // TINY_TRAIN["batch_size"]
    assert len(losses) == TINY_TRAIN["epochs"] * steps
    first, last = np.mean(losses[:steps]), np.mean(losses[-steps:])
    assert last < 0.5 * first, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    dev = json.loads((out / "metrics.json").read_text())["dev"]["layer_metric"]
    assert dev[-1] > 0.75, f"last layer is not above chance (0.5): {dev}"
    correct = np.load(out / "train_correct.npy")
    assert correct[-1, :, -1].mean() > correct[0, :, -1].mean()


def test_complete_checkpoint_is_not_retrained(tiny_checkpoint, tiny_task, tiny_encoder_dir, tmp_runs, capsys,
                                              monkeypatch):
    out, _ = tiny_checkpoint
    before = (out / WEIGHTS_NAME).stat().st_mtime_ns
    monkeypatch.setattr(tr, "weighted_exit_loss", lambda *a, **k: pytest.fail("retrained a complete checkpoint"))
    got = tr.train(tr.TrainConfig(task=TINY_TASK, model=str(tiny_encoder_dir), out=str(out), **TINY_TRAIN))
    assert got == out and "already trained" in capsys.readouterr().out
    assert tr.ensure_checkpoint(TINY_TASK, model=str(tiny_encoder_dir), out=str(out), **TINY_TRAIN) == out
    assert (out / WEIGHTS_NAME).stat().st_mtime_ns == before


class Crash(RuntimeError):
    pass


def test_resume_after_interruption(tmp_runs, tiny_task, tiny_encoder_dir, monkeypatch, capsys):
    """Crash at step 14 of 2 x 8; with save_every=3 the last save is step 12 (epoch 2, batch 4)."""
    cfg = tr.TrainConfig(task=TINY_TASK, model=str(tiny_encoder_dir), out=str(tmp_runs / "ck"), epochs=2,
                         batch_size=8, lr=3e-3, head_lr=1e-2, max_length=32, save_every=3)
    seen: list[np.ndarray] = []  # instance indices of every training batch, in order
    real_inputs, real_loss = tr.model_inputs, tr.weighted_exit_loss

    def recording_inputs(batch):
        seen.append(batch["idx"].numpy().copy())
        return real_inputs(batch)

    def crashing_loss(*a, **k):
        if len(seen) == 14:
            raise Crash("simulated interruption")
        return real_loss(*a, **k)

    monkeypatch.setattr(tr, "model_inputs", recording_inputs)
    monkeypatch.setattr(tr, "weighted_exit_loss", crashing_loss)
    with pytest.raises(Crash):
        tr.train(cfg)
    out = tmp_runs / "ck"
    assert not tr.is_complete(out) and not (out / "metrics.json").exists()
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert progress == {"epoch": 1, "step_in_epoch": 4, "global_step": 12,
                        "train_rows_sha256": tr.rows_sha256(tr.load_splits(cfg.resolved())[0])}
    partial = np.load(out / "state" / "train_correct.npy")
    assert (partial[0] >= 0).all() and (partial[1] >= 0).sum() == 4 * 8 * 2 and (partial[1] < 0).sum() == 4 * 8 * 2
    capsys.readouterr()

    seen.clear()
    monkeypatch.setattr(tr, "weighted_exit_loss", real_loss)
    assert tr.train(cfg) == out
    printed = capsys.readouterr().out
    assert "resuming ck at epoch 2, step 4" in printed
    assert len(seen) == 4, "only the 4 remaining steps run after resuming"
    c = cfg.resolved()
    enc = tr.Encoded(tr.load_splits(c)[0], tr.load_tokenizer(str(tiny_encoder_dir)), c.max_length)
    order = tr.length_grouped_order(enc.lengths, 8, np.random.default_rng(cfg.seed + 1))  # epoch 2's data order
    np.testing.assert_array_equal(np.concatenate(seen), order[32:])
    assert tr.is_complete(out) and not (out / "state").exists()
    correct = np.load(out / "train_correct.npy")
    assert correct.shape == (2, N_TRAIN, 2) and (correct >= 0).all()
    np.testing.assert_array_equal(correct[1][order[:32]], partial[1][order[:32]])  # kept from before the crash
    assert len(json.loads((out / "metrics.json").read_text())["dev"]["layer_metric"]) == 2
    assert (tmp_runs / "tb" / "stage1" / "ck").is_dir()


def test_objective_last_from_the_command_line(tmp_runs, tiny_task, tiny_encoder_dir, capsys):
    from accelerate.utils import set_seed

    tr.main(["--task", TINY_TASK, "--model", str(tiny_encoder_dir), "--objective", "last", "--epochs", "2",
             "--batch-size", "16", "--lr", "3e-3", "--head-lr", "1e-2", "--max-length", "32", "--save-every", "0"])
    out = tmp_runs / "stage1" / f"{TINY_TASK}-tiny-bert-cls-last-s0"  # the default run name
    assert tr.is_complete(out), sorted(p.name for p in tmp_runs.rglob("*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["objective"] == "last" and len(metrics["dev"]["layer_metric"]) == 2
    assert np.load(out / "train_correct.npy").shape == (2, N_TRAIN, 2)
    assert (tmp_runs / "tb" / "stage1" / out.name).is_dir()

    # only the last exit is trained: the layer-1 head is still its initial value (zero gradient, no decay)
    set_seed(0)
    init = MultiExitEncoder.from_pretrained_encoder(str(tiny_encoder_dir), 2, pooling="cls")
    trained = MultiExitEncoder.load(out)
    assert torch.equal(trained.heads[0][1].weight, init.heads[0][1].weight)
    assert not torch.equal(trained.heads[1][1].weight, init.heads[1][1].weight)


def test_own_task_from_a_task_file_on_the_command_line(tmp_path, tiny_encoder_dir):
    """A JSON task file beside CSV files, trained by ``python -m backbones.train --task-file`` in a fresh
    process (which has no in-process user tasks): the file alone defines the task."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n, seed in (("train", N_TRAIN, 5), ("dev", N_DEV, 6)):
        (data / f"{split}.csv").write_text("review,stars\n" + "".join(f"{s},{'five' if y else 'one'}\n"
                                                                      for s, y in make_rows(n, seed)))
    task_file = tmp_path / "reviews.json"
    task_file.write_text(json.dumps({"name": "Reviews", "train": "data/train.csv", "dev": "data/dev.csv",
                                     "text_a": "review", "label": "stars", "label_names": ["one", "five"],
                                     "metric": "accuracy"}))
    env = {**os.environ, "CEE_RUNS_DIR": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    flags = {**TINY_TRAIN, "epochs": 2, "save_every": 0}
    cmd = [sys.executable, "-m", "backbones.train", "--task-file", str(task_file), "--model", str(tiny_encoder_dir),
           *[x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = tmp_path / "runs" / "stage1" / "Reviews-tiny-bert-cls-eq1-s0"  # named after the file's task
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "Reviews" and metrics["dev"]["n"] == N_DEV and metrics["metric"] == "accuracy"
    assert metrics["config"]["task_file"] == str(task_file)
    assert MultiExitEncoder.load(out).config.label_names == ("one", "five")


# --------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_packaged_minilm_loads():
    m = MultiExitEncoder.from_pretrained_encoder(None, 2).eval()
    assert m.num_layers == 6 and m.config.pooling == "mean" and m.pooler is None
    tok = load_tokenizer(tr.resolve_model(None))
    b = dict(tok(["a good movie", "a rather bad one, really"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        out = m.encoder(**b, output_hidden_states=True)
        assert len(out.hidden_states) == 7  # embeddings + 6 layers
        logits, states = m(**b, return_states=True)
        hidden, mask = m.embed(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        for l in range(6):
            hidden = m.run_layer(l, hidden, mask)
            torch.testing.assert_close(hidden, out.hidden_states[l + 1], rtol=1e-4, atol=1e-4)
    assert logits.shape == (2, 6, 2) and states.shape == (2, 6, 384)


def test_task_defaults_fill_only_unset_fields():
    assert tr.TrainConfig(task="RTE").resolved().epochs == 5
    assert tr.TrainConfig(task="rte", epochs=2).resolved().epochs == 2
    assert tr.TrainConfig(task="MRPC").resolved().epochs == 3
    assert tr.TrainConfig(task="StackOverflow").resolved().max_train_samples == 6000
