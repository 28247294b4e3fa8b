"""Early-exit inference (agents.inference.early_exit_model, agents.predict) on a tiny BERT built from a config.

The central check: the classifier that really skips layers on raw text gives the same
predictions and exit layers as the evaluator (agents.evaluate) reports for the same
policy over the layer cache of the same split.
"""
import json
import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertTokenizerFast

from agents.inference.early_exit_model import EarlyExitClassifier, full_depth_logits
from agents.evaluate import evaluate
from agents.policies import LayerMLPPolicy, LearnedExit, StaticExit
from agents.policies.heuristics import EntropyExit, MaxProbExit, PatienceExit
from agents.predict import main, parse_rule, read_texts
from backbones.multiexit import MultiExitEncoder
from backbones.tasks import load_split
from cee_env.cache import get_cache

WORDS = ("the a man woman dog cat sleeps runs is not no yes park in on house red blue big small today and "
         "quickly slowly green old young").split()
LAYERS, HIDDEN, N_DEV = 3, 32, 40
LABELS = ("entailment", "not_entailment")


@pytest.fixture(autouse=True)
def _runs_and_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path / "runs"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and immune to a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer, hidden-32 multi-exit BERT checkpoint, an RTE-format dev file and its layer cache."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(d))  # transformers 5 ignores BertTokenizerFast(vocab_file=...)
    assert len(tok) == 5 + len(WORDS)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = MultiExitEncoder.from_encoder_config(cfg, 2, pooling="mean", max_length=24, task="RTE", label_names=LABELS)
    rng = random.Random(0)
    rows = ["index\tsentence1\tsentence2\tlabel"]
    for i in range(N_DEV):  # lengths vary a lot, some pairs get truncated: padding matters
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 16)))
        b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        rows.append(f"{i}\t{a}\t{b}\t{rng.choice(LABELS)}")
    (d / "dev.tsv").write_text("\n".join(rows) + "\n")
    # Random heads predict one class for everything; centre them on the dev states so answers vary.
    ds = load_split("RTE", "dev", path=str(d / "dev.tsv"))
    enc = tok(list(ds["text_a"]), list(ds["text_b"]), truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        _, states = model.eval()(**enc, return_states=True)
        for l, head in enumerate(model.heads):
            head[1].weight.normal_(0, 1.0)
            head[1].bias.copy_(-(states[:, l] @ head[1].weight.T).median(0).values)
    model.save(d / "ckpt", tok)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CEE_RUNS_DIR", str(d / "runs"))
        torch.set_num_threads(1)
        cache = get_cache("RTE", "dev", checkpoint=d / "ckpt", data_file=str(d / "dev.tsv"), verbose=False)
    return {"dir": d, "ckpt": d / "ckpt", "dev": d / "dev.tsv", "cache": cache, "ds": ds}


def gap_threshold(values) -> float:
    """A threshold splitting ``values`` near their median, at the midpoint of the widest gap in the middle half:
    mixed decisions, and no instance within float rounding of the threshold."""
    v = np.sort(np.ravel(values))
    lo, hi = len(v) // 4, 3 * len(v) // 4
    i = lo + int(np.argmax(np.diff(v[lo: hi + 1])))
    return float((v[i] + v[i + 1]) / 2)


def mixed_learned(cache) -> LearnedExit:
    """A random LayerMLPPolicy whose biases split each layer's instances near the median: mixed exits."""
    torch.manual_seed(1)
    net = LayerMLPPolicy(HIDDEN, LAYERS, hidden=8)
    net.set_normaliser(cache.states)
    with torch.no_grad():
        logits = net.all_layer_logits(torch.as_tensor(np.array(cache.states))).numpy()
        for l in range(LAYERS):
            net.b2[l, 0] -= gap_threshold(logits[:, l])
    return LearnedExit(net, 0.5)


def _entropy(lp):
    return -(np.exp(lp) * lp).sum(-1)


class GenericStatic(StaticExit):
    """A StaticExit the classifier does not recognise: goes through the generic layer loop."""


POLICIES = {
    "static-2": lambda c: StaticExit(2),
    "static-2-generic": lambda c: GenericStatic(2),
    "learned": mixed_learned,
    "maxprob": lambda c: MaxProbExit(gap_threshold(np.exp(np.asarray(c.log_probs)[:, 0].max(-1)))),
    "entropy": lambda c: EntropyExit(gap_threshold(_entropy(np.asarray(c.log_probs, dtype=np.float64)[:, 0]))),
    "patience-1": lambda c: PatienceExit(1),
}


@pytest.mark.parametrize("batch_size,sort", [(1, False), (8, False), (8, True)])
@pytest.mark.parametrize("kind", list(POLICIES))
def test_matches_evaluator(tiny, kind, batch_size, sort):
    cache, ds = tiny["cache"], tiny["ds"]
    policy = POLICIES[kind](cache)
    ev = evaluate(policy, cache)
    if kind in ("learned", "maxprob", "entropy", "patience-1"):
        assert len(set(ev.exit_layers.tolist())) >= 2, "the test policy should exit at mixed layers"
    clf = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    res = clf.predict(ds["text_a"], ds["text_b"], batch_size=batch_size, sort_by_length=sort)
    np.testing.assert_array_equal(res.exit_layers, ev.exit_layers)
    np.testing.assert_array_equal(res.label_ids, ev.preds)
    assert res.labels == [LABELS[i] for i in ev.preds]
    # the exit layer's classifier output; equal up to float rounding (padding and batch shape differ)
    want = np.asarray(cache.log_probs)[np.arange(len(ds)), ev.exit_layers - 1]
    np.testing.assert_allclose(res.log_probs, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-5)
    assert res.probs.shape == (N_DEV, 2) and res.avg_exit_layer == pytest.approx(ev.avg_exit_layer)


def _count_layers(monkeypatch, clf):
    """Record (layer, rows, columns) of every transformer layer call."""
    calls = []
    run_layer = clf.model.run_layer

    def counting(l, hidden, mask):
        calls.append((l, hidden.shape[0], hidden.shape[1]))
        return run_layer(l, hidden, mask)

    monkeypatch.setattr(clf.model, "run_layer", counting)
    return calls


@pytest.mark.parametrize("policy", [StaticExit(1), GenericStatic(1)], ids=["static", "generic"])
def test_static_1_runs_only_layer_1(tiny, monkeypatch, policy):
    clf = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    calls = _count_layers(monkeypatch, clf)
    res = clf.predict(tiny["ds"]["text_a"], tiny["ds"]["text_b"], batch_size=8)
    assert [c[0] for c in calls] == [0] * 5 and res.layer_calls == 5
    assert (res.exit_layers == 1).all()


def test_exited_rows_and_padding_leave_the_batch(tiny, monkeypatch):
    ds, cache = tiny["ds"], tiny["cache"]
    policy = mixed_learned(cache)
    clf = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    calls = _count_layers(monkeypatch, clf)
    # a batch whose longest instances exit at layer 1: the padding they needed goes with them
    all_len = np.array([len(f["input_ids"]) for f in clf.tokenize(ds["text_a"], ds["text_b"])])
    ex = evaluate(policy, cache).exit_layers
    first = np.flatnonzero(ex == 1)
    later = np.flatnonzero(ex > 1)
    pick = np.concatenate([first[np.argsort(-all_len[first])[:3]], later[np.argsort(all_len[later])[:5]]])
    rng = np.random.default_rng(0)
    pick = rng.permutation(pick).tolist()
    a, b = [ds["text_a"][i] for i in pick], [ds["text_b"][i] for i in pick]
    n = len(pick)
    res = clf.predict(a, b, batch_size=n)
    lengths = all_len[pick]
    np.testing.assert_array_equal(res.exit_layers, ex[pick])
    assert 1 < res.exit_layers.max() and res.exit_layers.min() < LAYERS
    expect = [(l, int((res.exit_layers > l).sum()), int(lengths[res.exit_layers > l].max()))
              for l in range(LAYERS) if (res.exit_layers > l).any()]
    assert calls == expect  # only remaining rows, only the columns the longest of them needs
    assert calls[1][2] < calls[0][2]
    assert res.layer_calls == len(expect)
    # without trimming: same answers
    plain = EarlyExitClassifier(clf.model, clf.tokenizer, policy, trim_padding=False)
    res2 = plain.predict(a, b, batch_size=n)
    np.testing.assert_array_equal(res2.exit_layers, res.exit_layers)
    np.testing.assert_array_equal(res2.label_ids, res.label_ids)


def test_full_depth_helpers_agree(tiny):
    clf = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], parse_rule("full"))
    feats = clf.tokenize(tiny["ds"]["text_a"], tiny["ds"]["text_b"])
    _, inputs = next(clf.batches(feats, 16))
    a = full_depth_logits(clf.model, **inputs)
    b = full_depth_logits(clf.model, **inputs, plain_forward=True)
    logp, exits, calls = clf.classify_batch(**inputs)
    assert (exits == LAYERS).all() and calls == LAYERS
    np.testing.assert_allclose(torch.log_softmax(a, -1).numpy(), logp, atol=1e-5)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


class NeverExit(StaticExit):
    def __init__(self):
        super().__init__(10 ** 9)


@pytest.mark.parametrize("batch_size", [16, 1])
@pytest.mark.parametrize("stock_heads", [True, False])
def test_generic_loop_is_bitwise_the_forward(tiny, stock_heads, batch_size):
    """At full depth on the same (padded, or unpadded) batch, the loop's last-layer log-probs are exactly forward()'s."""
    model = MultiExitEncoder.load(tiny["ckpt"])
    if not stock_heads:  # not Dropout + Linear: the classifier falls back to model.classify
        model.heads = torch.nn.ModuleList(torch.nn.Sequential(*h, torch.nn.Identity()) for h in model.heads)
    clf = EarlyExitClassifier(model, EarlyExitClassifier.from_checkpoint(tiny["ckpt"], StaticExit(1)).tokenizer,
                              NeverExit())
    _, inputs = next(clf.batches(clf.tokenize(tiny["ds"]["text_a"], tiny["ds"]["text_b"]), batch_size))
    assert bool(inputs["attention_mask"].all()) == (batch_size == 1)
    logp, exits, _ = clf.classify_batch(**inputs)
    with torch.inference_mode():
        want = torch.log_softmax(model(**inputs)[:, -1].float(), -1).numpy()
    assert (exits == LAYERS).all()
    np.testing.assert_array_equal(logp, want)


def test_single_texts_and_empty(tiny):
    clf = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], mixed_learned(tiny["cache"]))
    texts = ["the man sleeps", "a big red dog runs in the park today", "no"]
    r1, r3 = clf.predict(texts, batch_size=1), clf.predict(texts, ["", "", ""], batch_size=3)
    np.testing.assert_array_equal(r1.exit_layers, r3.exit_layers)
    np.testing.assert_array_equal(r1.label_ids, r3.label_ids)
    empty = clf.predict([])
    assert len(empty) == 0 and empty.probs.shape == (0, 2)
    with pytest.raises(ValueError, match="texts_b"):
        clf.predict(texts, ["x"])


def save_run(tiny, run_dir, policy: LearnedExit, **extra):
    from agents.runtime import policy_record

    policy.net.save(run_dir, extra={**policy_record(tiny["cache"]), "checkpoint": str(tiny["ckpt"]), **extra})
    return run_dir


def test_from_run(tiny, tmp_path):
    policy = mixed_learned(tiny["cache"])
    run = save_run(tiny, tmp_path / "run", policy, threshold=0.5)
    clf = EarlyExitClassifier.from_run(run)
    res = clf.predict(tiny["ds"]["text_a"], tiny["ds"]["text_b"], batch_size=8)
    ev = evaluate(policy, tiny["cache"])
    np.testing.assert_array_equal(res.exit_layers, ev.exit_layers)
    np.testing.assert_array_equal(res.label_ids, ev.preds)
    strict = EarlyExitClassifier.from_run(run, threshold=1.0)  # sigmoid never exceeds 1: full depth
    assert (strict.predict(["the dog"]).exit_layers == LAYERS).all()
    with pytest.raises(FileNotFoundError, match="not found"):
        EarlyExitClassifier.from_run(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="policy.json"):
        EarlyExitClassifier.from_run(tmp_path)
    wrong = LearnedExit(LayerMLPPolicy(HIDDEN, LAYERS + 1))
    with pytest.raises(ValueError, match="layers"):
        EarlyExitClassifier.from_checkpoint(tiny["ckpt"], wrong)


def test_from_sb3_run(tiny, tmp_path):
    """An agents.sb3 run (model.zip + sb3_policy.json) loads too and agrees with the evaluator."""
    sb3 = pytest.importorskip("agents.sb3")
    from stable_baselines3 import PPO

    from cee_env import EarlyExitEnv

    cache = tiny["cache"]
    env = EarlyExitEnv(cache=cache, obs="state_layer", obs_bound=50.0)
    model = PPO("MlpPolicy", env, seed=0, n_steps=64, batch_size=32, device="cpu")
    mean = np.asarray(cache.states, dtype=np.float64).reshape(-1, HIDDEN).mean(0)
    var = np.asarray(cache.states, dtype=np.float64).reshape(-1, HIDDEN).var(0)
    obs_mean = np.concatenate([mean, np.zeros(LAYERS)])
    obs_var = np.concatenate([var, np.ones(LAYERS)])
    policy = sb3.SB3Exit(model, LAYERS, 50.0, obs_mean, obs_var)  # 50: the env's default obs_bound
    run = tmp_path / "sb3run"
    from agents.runtime import policy_record

    policy.save(run, extra=policy_record(cache))
    clf = EarlyExitClassifier.from_run(run)
    res = clf.predict(tiny["ds"]["text_a"], tiny["ds"]["text_b"], batch_size=8)
    ev = evaluate(sb3.SB3Exit.load(run), cache)
    np.testing.assert_array_equal(res.exit_layers, ev.exit_layers)
    np.testing.assert_array_equal(res.label_ids, ev.preds)
    # a threshold (e.g. chosen by agents.calibrate) replaces the greedy action by pi(Exit) > threshold
    thr = EarlyExitClassifier.from_run(run, threshold=0.3)
    res = thr.predict(tiny["ds"]["text_a"], tiny["ds"]["text_b"], batch_size=8)
    sb = sb3.SB3Exit.load(run)
    sb.threshold = 0.3
    np.testing.assert_array_equal(res.exit_layers, evaluate(sb, cache).exit_layers)
    probs = sb.exit_probs(cache.states, cache.log_probs)
    expect = (probs > 0.3)
    expect[:, -1] = True
    np.testing.assert_array_equal(res.exit_layers, expect.argmax(1) + 1)


def test_cli_policy_run_on_task_file(tiny, tmp_path, capsys):
    policy = mixed_learned(tiny["cache"])
    run = save_run(tiny, tmp_path / "run", policy)
    out = tmp_path / "preds.tsv"
    rc = main(["--run", str(run), "--task", "RTE", "--input", str(tiny["dev"]), "--batch-size", "4",
               "--out", str(out)])
    assert rc == 0
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == ["index", "label", "exit_layer", "probability", "gold"]
    rows = [line.split("\t") for line in lines[1:]]
    ev = evaluate(policy, tiny["cache"])
    assert [int(r[2]) for r in rows] == ev.exit_layers.tolist()
    assert [r[1] for r in rows] == [LABELS[i] for i in ev.preds]
    assert all(0.5 <= float(r[3]) <= 1.0 for r in rows)
    err = capsys.readouterr().err
    assert f"{N_DEV} instances" in err and "accuracy" in err


def test_cli_checkpoint_rule_text_file_and_text_args(tiny, tmp_path, capsys):
    f = tmp_path / "in.txt"
    f.write_text("the man sleeps\tno man sleeps\n\na dog runs\tthe dog is old\n")
    assert read_texts(f) == (["the man sleeps", "a dog runs"], ["no man sleeps", "the dog is old"])
    assert main(["--checkpoint", str(tiny["ckpt"]), "--rule", "static-2", "--input", str(f)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["index", "label", "exit_layer", "probability"] and len(rows) == 3
    assert {r[2] for r in rows[1:]} == {"2"} and {r[1] for r in rows[1:]} <= set(LABELS)
    assert main(["--checkpoint", str(tiny["ckpt"]), "--rule", "entropy:0.1", "--text", "the dog",
                 "--text", "a cat", "--text-b", "x", "--text-b", "y"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.parametrize("argv,msg", [
    (["--run", "{tmp}/absent", "--text", "x"], "policy run directory not found"),
    (["--checkpoint", "{ckpt}", "--rule", "static-1", "--input", "{tmp}/absent.txt"], "input file not found"),
    (["--checkpoint", "{ckpt}", "--text", "x"], "needs --rule"),
    (["--checkpoint", "{tmp}/nock", "--rule", "static-1", "--text", "x"], "checkpoint directory not found"),
    (["--checkpoint", "{ckpt}", "--rule", "static-1"], "nothing to classify"),
    (["--checkpoint", "{ckpt}", "--rule", "static-1", "--text", "x", "--text-b", "y", "--text-b", "z"],
     "2 --text-b for 1 --text"),
    (["--checkpoint", "{ckpt}", "--rule", "static-1", "--task", "RTE", "--task-file", "t.json"], "not both"),
    (["--checkpoint", "{ckpt}", "--rule", "sometimes", "--text", "x"], "unknown exit rule"),
    (["--checkpoint", "{ckpt}", "--rule", "full", "--task-file", "{tmp}/absent.toml"], "task file not found"),
])
def test_cli_usage_errors(tiny, tmp_path, capsys, monkeypatch, argv, msg):
    monkeypatch.delenv("CEE_DEBUG", raising=False)
    argv = [a.format(tmp=tmp_path, ckpt=tiny["ckpt"]) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_cli_runtime_errors(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CEE_DEBUG", raising=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "policy.json").write_text(json.dumps({"state_dim": HIDDEN, "num_layers": LAYERS}))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for argv, msg in ((["--run", str(tmp_path / "run"), "--text", "x"], "policy.safetensors is missing"),
                      (["--checkpoint", str(tiny["ckpt"]), "--rule", "full", "--input", str(empty)], "holds no texts")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_cli_task_file(tiny, tmp_path, capsys):
    """--task-file: your own task's split, read and scored (the dev file of the tiny RTE-format task)."""
    f = tmp_path / "pairs.toml"
    f.write_text(f'name = "TinyPairs"\ntrain = "{tiny["dev"]}"\ndev = "{tiny["dev"]}"\ntext_a = "sentence1"\n'
                 f'text_b = "sentence2"\nlabel = "label"\nlabel_names = {json.dumps(list(LABELS))}\n'
                 f'metric = "accuracy"\nfmt = "glue_tsv"\n')
    out = tmp_path / "preds.tsv"
    assert main(["--checkpoint", str(tiny["ckpt"]), "--rule", "static-2", "--task-file", str(f), "--out", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0][-1] == "gold" and len(rows) == N_DEV + 1 and {r[2] for r in rows[1:]} == {"2"}
    assert f"{N_DEV} instances" in capsys.readouterr().err


def test_parse_rule():
    assert parse_rule("static-3").k == 3 and parse_rule("static:2").k == 2 and parse_rule("full").name == "full"
    assert isinstance(parse_rule("maxprob:0.9"), MaxProbExit) and parse_rule("maxprob:0.9").threshold == 0.9
    assert isinstance(parse_rule("entropy:0.2"), EntropyExit) and isinstance(parse_rule("deebert:0.2"), EntropyExit)
    assert parse_rule("patience:2").patience == 2 and parse_rule("pabee:1").patience == 1
    assert (parse_rule("full").exit_at_layer(4, None, np.zeros((3, 5, 2))) == False).all()  # noqa: E712
    for bad in ("static-0", "maxprob", "nope:1", "patience:x"):
        with pytest.raises(ValueError, match="unknown exit rule"):
            parse_rule(bad)
