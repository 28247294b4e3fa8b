"""The ONNX Runtime path (agents.inference.onnx_runtime): the same exits and predictions as the PyTorch path,
and a cached export that is checked against what it was made from.

Tolerance: log-probabilities within 1e-4 of PyTorch's (measured ~1e-6 on these tiny models) and
identical exit layers (the test policies' thresholds sit in wide gaps of the scores, so float
rounding cannot move an exit).
"""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the fast path needs onnxruntime: pip install -e '.[fast]' (make setup)")

from agents.evaluate import evaluate  # noqa: E402
from agents.inference import onnx_runtime as OR  # noqa: E402
from agents.inference.early_exit_model import EarlyExitClassifier, full_depth_logits  # noqa: E402
from agents.inference.onnx_runtime import OnnxEarlyExitClassifier, OnnxGraphs, export_graphs  # noqa: E402
from agents.policies.heuristics import MaxProbExit  # noqa: E402
from backbones.files import IntegrityError  # noqa: E402
from backbones.multiexit import MultiExitConfig, MultiExitEncoder  # noqa: E402
from tests.test_families import CONFIGS, base_model, batch  # noqa: E402
from tests.test_inference import LAYERS, POLICIES, mixed_learned, tiny  # noqa: E402,F401

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _runs_and_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path / "runs"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def exports(monkeypatch):
    """The exports made during a test (checkpoint folders)."""
    made = []
    real = OR.export_graphs

    def counting(model, folder):
        made.append(folder)
        return real(model, folder)

    monkeypatch.setattr(OR, "export_graphs", counting)
    return made


@pytest.fixture(scope="module")
def tiny_graphs(tiny, tmp_path_factory):
    """The tiny checkpoint's export, made once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CEE_RUNS_DIR", str(tmp_path_factory.mktemp("onnx_runs")))
        return OR.load_graphs(tiny["ckpt"], threads=1)


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("kind", ["static-2", "static-2-generic", "learned", "maxprob", "entropy", "patience-1"])
def test_onnx_path_equals_the_torch_path_and_the_evaluator(tiny, tiny_graphs, kind, batch_size):
    cache, ds = tiny["cache"], tiny["ds"]
    policy = POLICIES[kind](cache)
    ref = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    want = ref.predict(ds["text_a"], ds["text_b"], batch_size=batch_size)
    clf = OnnxEarlyExitClassifier(ref.model, ref.tokenizer, policy, tiny_graphs)
    got = clf.predict(ds["text_a"], ds["text_b"], batch_size=batch_size)
    np.testing.assert_array_equal(got.exit_layers, want.exit_layers)
    np.testing.assert_array_equal(got.label_ids, want.label_ids)
    np.testing.assert_allclose(got.log_probs, want.log_probs, atol=ATOL, rtol=0)
    ev = evaluate(policy, cache)
    np.testing.assert_array_equal(got.exit_layers, ev.exit_layers)
    np.testing.assert_array_equal(got.label_ids, ev.preds)
    if kind not in ("static-2", "static-2-generic"):
        assert len(set(got.exit_layers.tolist())) >= 2  # rows left the batch at different layers


def test_context_is_made_once_per_batch_and_again_only_after_rows_leave(tiny, tiny_graphs, monkeypatch):
    """The first graph returns the layers' context with layer 1; the context graph runs only when rows left
    the batch (never at batch 1), and the rows that go on are scored with their own context (as PyTorch)."""
    calls = []
    real = OnnxGraphs.context
    monkeypatch.setattr(OnnxGraphs, "context", lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a))
    policy = POLICIES["maxprob"](tiny["cache"])
    ref = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    clf = OnnxEarlyExitClassifier(ref.model, ref.tokenizer, policy, tiny_graphs)
    ds = tiny["ds"]
    one = clf.predict(ds["text_a"][:12], ds["text_b"][:12], batch_size=1)
    assert calls == [] and len(set(one.exit_layers.tolist())) >= 2
    got = clf.predict(ds["text_a"], ds["text_b"], batch_size=8)
    assert calls and all(0 < b < 8 for b in calls)  # after rows left: the remaining rows only
    np.testing.assert_array_equal(got.exit_layers, ref.predict(ds["text_a"], ds["text_b"], batch_size=8).exit_layers)


def test_whole_model_graph_is_the_full_depth_model(tiny, tiny_graphs):
    ref = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], MaxProbExit(0.9))
    clf = OnnxEarlyExitClassifier(ref.model, ref.tokenizer, ref.policy, tiny_graphs)
    feats = clf.tokenize(tiny["ds"]["text_a"], tiny["ds"]["text_b"])
    for _, inputs in clf.batches(feats, 16):
        want = torch.log_softmax(full_depth_logits(clf.model, **inputs), -1).numpy()
        got = clf.graphs.full_depth(**{k: v.numpy() for k, v in inputs.items()})
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_export_is_cached_and_rebuilt_when_a_graph_is_edited(tiny, exports, capsys):
    clf = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], MaxProbExit(0.9), runtime="onnx", threads=1)
    assert isinstance(clf, OnnxEarlyExitClassifier) and clf.graphs.threads == 1
    OnnxEarlyExitClassifier.from_checkpoint(tiny["ckpt"], MaxProbExit(0.8))
    assert len(exports) == 1  # once per checkpoint
    folder = exports[0]
    rec = json.loads((folder / OR.RECORD).read_text())
    assert set(rec["files"]) == {"first.onnx", "context.onnx", "full.onnx",
                                 *(f"layer_{l}.onnx" for l in range(LAYERS))}
    layer = folder / "layer_1.onnx"
    data = bytearray(layer.read_bytes())
    data[-20] ^= 0xFF  # a changed weight byte: the file still loads, with other numbers
    layer.write_bytes(bytes(data))
    capsys.readouterr()
    clf = OnnxEarlyExitClassifier.from_checkpoint(tiny["ckpt"], mixed_learned(tiny["cache"]))
    assert len(exports) == 2 and exports[1] == folder
    assert "layer_1.onnx does not match the sha256" in capsys.readouterr().err
    ev = evaluate(clf.policy, tiny["cache"])
    np.testing.assert_array_equal(clf.predict(tiny["ds"]["text_a"], tiny["ds"]["text_b"]).exit_layers, ev.exit_layers)
    (folder / "full.onnx").unlink()
    OnnxEarlyExitClassifier.from_checkpoint(tiny["ckpt"], MaxProbExit(0.9))
    assert len(exports) == 3 and (folder / "full.onnx").is_file()


def test_a_changed_checkpoint_gets_its_own_export_and_a_tampered_one_is_refused(tiny, exports, tmp_path):
    model = MultiExitEncoder.load(tiny["ckpt"])
    tok = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], MaxProbExit(0.9)).tokenizer
    ckpt = tmp_path / "ckpt"
    model.save(ckpt, tok)
    a = OnnxEarlyExitClassifier.from_checkpoint(ckpt, POLICIES["learned"](tiny["cache"]))
    with torch.no_grad():
        model.heads[0][1].bias.add_(torch.tensor([3.0, -3.0]))  # layer 1 now leans to class 0
    model.save(ckpt, tok)  # retrained: new weights, new sha256 in multiexit.json
    b = OnnxEarlyExitClassifier.from_checkpoint(ckpt, POLICIES["learned"](tiny["cache"]))
    assert len(exports) == 2 and exports[0] != exports[1]
    ids = {k: v.numpy() for k, v in next(b.batches(b.tokenize(["the man sleeps", "a dog"]), 2))[1].items()}
    la = a.graphs.first(ids["input_ids"], ids["attention_mask"], ids.get("token_type_ids"))[2]
    lb = b.graphs.first(ids["input_ids"], ids["attention_mask"], ids.get("token_type_ids"))[2]
    np.testing.assert_allclose(lb[:, 0] - lb[:, 1], la[:, 0] - la[:, 1] + 6.0, atol=1e-4)
    # weights edited behind the checkpoint's back (its recorded sha256 no longer matches): refused
    w = ckpt / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-8] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        OnnxEarlyExitClassifier.from_checkpoint(ckpt, MaxProbExit(0.9))
    assert len(exports) == 2


@pytest.mark.parametrize("kind", ["bert", "mpnet", "distilbert", "deberta-v2", "llama"])
def test_families_export_one_graph_per_layer(kind, tmp_path):
    """The layer graphs build the family's context inside (MPNet's relative position bias, DeBERTa's relative
    embeddings, Llama's causal mask and rotary positions): the ONNX loop equals the PyTorch loop."""
    base = base_model(kind)
    decoder = kind == "llama"
    model = MultiExitEncoder(MultiExitConfig(model="<config>", num_labels=3, pooling="last" if decoder else "mean",
                                             label_names=("a", "b", "c")), base).eval()
    export_graphs(model, tmp_path / "g")
    graphs = OnnxGraphs(tmp_path / "g", model.num_layers, threads=1)
    ids, mask = batch(3, 9)
    with torch.no_grad():
        logits = model(ids, mask)
    logp = torch.log_softmax(logits, -1).numpy()
    rule = MaxProbExit(threshold=float(np.median(np.exp(logp[:, 0]).max(-1))))
    want_logp, want_exit, _ = EarlyExitClassifier(model, None, rule).classify_batch(ids, mask)
    got_logp, got_exit, _ = OnnxEarlyExitClassifier(model, None, rule, graphs).classify_batch(ids, mask)
    assert len(set(want_exit)) > 1  # rows leave the batch at different layers
    np.testing.assert_array_equal(got_exit, want_exit)
    np.testing.assert_allclose(got_logp, want_logp, atol=ATOL, rtol=0)
    np.testing.assert_allclose(graphs.full_depth(ids.numpy(), mask.numpy()), logp[:, -1], atol=ATOL, rtol=0)
    ids2, mask2 = batch(2, 5, seed=3)  # another shape: the axes are dynamic
    with torch.no_grad():
        want = torch.log_softmax(model(ids2, mask2)[:, -1], -1).numpy()
    np.testing.assert_allclose(graphs.full_depth(ids2.numpy(), mask2.numpy()), want, atol=ATOL, rtol=0)


def test_an_export_that_does_not_reproduce_pytorch_is_refused(tiny, monkeypatch, tmp_path):
    """A graph traced with a shape baked in (here: a layer that only works at the traced length) fails the
    check on a batch of another shape instead of giving wrong answers later."""
    model = MultiExitEncoder.load(tiny["ckpt"])
    real = OR._Layer.forward

    def shape_bound(self, hidden, attention_mask, *ctx):
        h, pooled, logp = real(self, hidden, attention_mask, *ctx)
        return h, pooled, logp + 0.01 * int(hidden.shape[1])  # int(): the traced length is a constant

    monkeypatch.setattr(OR._Layer, "forward", shape_bound)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_graphs(model, tmp_path / "g")


def test_predict_cli_runtime_onnx(tiny, tmp_path, capsys):
    from agents.predict import main

    base = ["--checkpoint", str(tiny["ckpt"]), "--rule", "patience:1", "--task", "RTE", "--input", str(tiny["dev"]),
            "--batch-size", "4", "--threads", "1"]
    main(base + ["--out", str(tmp_path / "t.tsv")])
    main(base + ["--runtime", "onnx", "--out", str(tmp_path / "o.tsv")])
    assert "(onnx)" in capsys.readouterr().err
    t = [line.split("\t") for line in (tmp_path / "t.tsv").read_text().splitlines()]
    o = [line.split("\t") for line in (tmp_path / "o.tsv").read_text().splitlines()]
    assert [r[:3] + r[4:] for r in o] == [r[:3] + r[4:] for r in t]  # labels, exit layers, gold
    np.testing.assert_allclose([float(r[3]) for r in o[1:]], [float(r[3]) for r in t[1:]], atol=1e-5)
    with pytest.raises(SystemExit) as e:
        main(base + ["--runtime", "tensorrt"])
    assert e.value.code == 2 and "--runtime must be one of torch, onnx" in capsys.readouterr().err

