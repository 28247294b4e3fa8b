"""Shared fixtures: a tiny BERT (2 layers, hidden 32) with a tiny WordPiece vocab, and a tiny learnable task.

Nothing here touches ``runs/``: everything is written under pytest's tmp dirs, and
``tmp_runs`` points ``CEE_RUNS_DIR`` at a tmp dir for the test that asks for it.

- ``tiny_tokenizer`` / ``tiny_bert_config``: a BertTokenizerFast over a 22-word vocab and a
  matching 2-layer BERT config; build models with ``BertModel(tiny_bert_config)``.
- ``tiny_encoder_dir``: that model saved as a pretrained encoder folder (weights + tokenizer),
  usable as ``TrainConfig(model=...)`` / ``--model``.
- ``tiny_task``: a registered user task (``TinyGood``): label ``pos`` iff the word "good"
  occurs (negatives contain "bad"); 64 train / 32 dev rows.
- ``tiny_rte_files``: the same signal in GLUE RTE's format, for subprocesses (``--task RTE
  --train-file ... --dev-file ...``), where in-process user tasks do not exist.
- ``tiny_checkpoint``: a stage-1 checkpoint trained once per session on ``tiny_task``; ``ckpt``: its folder.
- ``load_counter``: the checkpoint loads made during a test (one per layer cache built).
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

TINY_TASK = "TinyGood"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "quite", "story",
          "and", "it", "this", "scene"]
WORDS = FILLER + ["good", "bad"]
N_TRAIN, N_DEV = 64, 32
# Fast training settings for the tiny model (random initial weights, so high learning rates). With them the
# default pooling for a plain BERT folder (cls) reaches 100% dev accuracy on the tiny task in 6 x 8 steps.
TINY_TRAIN = dict(epochs=6, batch_size=8, lr=3e-3, head_lr=1e-2, warmup=0.1, max_length=32, eval_batch_size=16)


def make_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Balanced (sentence, label) pairs: label 1 iff "good" is in the sentence (else "bad" is)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
        words.insert(rng.randint(0, len(words)), "good" if y else "bad")
        rows.append((" ".join(words), y))
    rng.shuffle(rows)
    return rows


def _write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(SPECIALS + WORDS) + "\n")
    return path


def _bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine thread contention makes
    every backward pass ~30x slower; one intra-op thread keeps the suite fast."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_vocab_file(tmp_path_factory) -> Path:
    return _write_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_vocab_file):
    from transformers import BertTokenizerFast

    # transformers 5 ignores BertTokenizerFast(vocab_file=...); from_pretrained reads the folder's vocab.txt.
    tok = BertTokenizerFast.from_pretrained(str(tiny_vocab_file.parent))
    assert tok.convert_tokens_to_ids("good") == SPECIALS.__len__() + WORDS.index("good")
    return tok


@pytest.fixture()
def tiny_bert_config(tiny_tokenizer):
    return _bert_config(len(tiny_tokenizer))


def save_tiny_encoder(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A randomly initialised tiny BERT saved as a pretrained encoder folder (model + tokenizer)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel(_bert_config(len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("encoders") / "tiny-bert", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_task_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tinytask")
    files = {}
    for split, n, seed in (("train", N_TRAIN, 1), ("dev", N_DEV, 2)):
        f = d / f"{split}.tsv"
        f.write_text("text\tlabel\n" + "".join(f"{s}\t{'pos' if y else 'neg'}\n" for s, y in make_rows(n, seed)))
        files[split] = f
    return files


def register_tiny_task(files: dict[str, Path]):
    from backbones.tasks import task_from_file

    return task_from_file(TINY_TASK, files["train"], text_a="text", label="label", dev_path=files["dev"],
                          label_names=["neg", "pos"])


@pytest.fixture()
def tiny_task(tiny_task_files):
    """The tiny user task, (re-)registered for this test (other tests may reset the task table)."""
    return register_tiny_task(tiny_task_files)


@pytest.fixture(scope="session")
def tiny_rte_files(tmp_path_factory) -> dict[str, Path]:
    """RTE-format TSVs (index, sentence1, sentence2, label): entailment iff "good" is in sentence2.

    60 train / 30 dev rows: not a multiple of 2 processes x batch size, so DDP pads the last batch.
    """
    d = tmp_path_factory.mktemp("tinyrte")
    files = {}
    for split, n, seed in (("train", 60, 3), ("dev", 30, 4)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i, (s, y) in enumerate(make_rows(n, seed)):
            lines.append(f"{i}\tthe story is a movie\t{s}\t{'entailment' if y else 'not_entailment'}")
        f = d / f"{split}.tsv"
        f.write_text("\n".join(lines) + "\n")
        files[split] = f
    return files


@pytest.fixture()
def tmp_runs(tmp_path, monkeypatch) -> Path:
    """Point CEE_RUNS_DIR at a fresh tmp dir (checkpoints, caches, TensorBoard logs go there)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("CEE_RUNS_DIR", str(runs))
    return runs


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_task_files, tiny_encoder_dir):
    """One stage-1 (Eq 1) training run on the tiny task, shared by the session.

    Returns ``(checkpoint_dir, losses)`` with the training loss of every optimizer step.
    """
    import backbones.train as tr

    losses: list[float] = []
    real_loss = tr.weighted_exit_loss

    def recording_loss(*a, **k):
        loss = real_loss(*a, **k)
        losses.append(float(loss.detach()))
        return loss

    root = tmp_path_factory.mktemp("session_runs")
    register_tiny_task(tiny_task_files)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CEE_RUNS_DIR", str(root))
        mp.setattr(tr, "weighted_exit_loss", recording_loss)
        out = tr.train(tr.TrainConfig(task=TINY_TASK, model=str(tiny_encoder_dir), out=str(root / "ckpt"),
                                      save_every=0, **TINY_TRAIN))
    return out, losses


@pytest.fixture()
def ckpt(tiny_checkpoint, tiny_task):
    """The session's tiny stage-1 checkpoint, its task registered."""
    return tiny_checkpoint[0]


@pytest.fixture()
def load_counter(monkeypatch):
    """Counts how often a checkpoint is loaded (i.e. how often get_cache builds a cache)."""
    from backbones.multiexit import MultiExitEncoder

    calls = []
    real = MultiExitEncoder.load.__func__

    def counting(cls, d):
        calls.append(str(d))
        return real(cls, d)

    monkeypatch.setattr(MultiExitEncoder, "load", classmethod(counting))
    return calls
