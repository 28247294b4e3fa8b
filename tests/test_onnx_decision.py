"""agents.inference.onnx_decision: the exit decision as ONNX graphs makes the policy's own decisions, layer by
layer with the history carried between graphs, and its export is cached per policy and checked."""
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the fast path needs onnxruntime: pip install -e '.[fast]' (make setup)")
import onnxruntime as ort  # noqa: E402

from agents.evaluate import evaluate  # noqa: E402
from agents.inference import onnx_decision as OD  # noqa: E402
from agents.inference.early_exit_model import EarlyExitClassifier  # noqa: E402
from agents.inference.onnx_runtime import OnnxEarlyExitClassifier  # noqa: E402
from agents.policies import StaticExit  # noqa: E402
from agents.policies.heuristics import EntropyExit, MaxProbExit, PatienceExit, max_prob, prediction_entropy  # noqa: E402
from cee_env.observations import OBS_MODES  # noqa: E402
from tests.test_inference import POLICIES, gap_threshold, tiny  # noqa: E402,F401
from tests.test_onnx import tiny_graphs  # noqa: E402,F401
from tests.test_stepper import cache, learned  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CEE_RUNS_DIR", str(tmp_path / "runs"))


def graph_decisions(policy, cache, folder, drop_every: int = 0) -> np.ndarray:
    """exit mask [N, L-1] from the exported decision graphs run one layer at a time (the carried history passed
    from graph to graph); with ``drop_every`` rows leave as in inference and read -1 after they left."""
    mods = OD.decision_modules(policy, cache.num_layers, cache.num_classes)
    assert mods is not None
    d = OD.ensure_decisions(folder, mods, cache.hidden_size)
    n, L = cache.num_instances, cache.num_layers
    out = np.full((n, L - 1), -1)
    rows = np.arange(n)
    carry = [np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    for l in range(L - 1):
        sess = ort.InferenceSession(str(d / f"decide_{l}.onnx"), providers=["CPUExecutionProvider"])
        feed = {"pooled": np.asarray(cache.states[rows, l], np.float32),
                "log_probs": np.asarray(cache.log_probs[rows, l], np.float32), **dict(zip(OD.CARRY, carry))}
        names = {i.name for i in sess.get_inputs()}
        ex, _, *carry = sess.run(None, {k: v for k, v in feed.items() if k in names})
        out[rows, l] = ex
        if drop_every:
            keep = np.flatnonzero(np.arange(len(rows)) % drop_every != 0)
            rows, carry = rows[keep], [c[keep] for c in carry]
    return out


def check(policy, cache, folder):
    want = policy.exit_mask(cache)[:, :-1]
    assert 0.05 < want.mean() < 0.95, "decisions should be mixed for the test to mean anything"
    np.testing.assert_array_equal(graph_decisions(policy, cache, folder), want)
    got = graph_decisions(policy, cache, folder, drop_every=3)
    seen = got >= 0
    assert seen[:, -1].any() and not seen.all()
    np.testing.assert_array_equal(got[seen], want[seen])


@pytest.mark.parametrize("mode", OBS_MODES)
@pytest.mark.parametrize("shared", [False, True])
def test_learned_exit_decision_graphs_equal_exit_at_layer(cache, mode, shared, tmp_path):
    check(learned(cache, mode, shared), cache, tmp_path)


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_sb3_decision_graphs_equal_exit_at_layer(cache, algo, tmp_path):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import DQN, PPO

    from agents.sb3 import SB3Exit, cache_obs_stats
    from cee_env import EarlyExitEnv

    mode = "confidence"
    env = EarlyExitEnv(cache=cache, obs=mode, obs_bound=50.0)
    cls, kw = {"ppo": (PPO, dict(n_steps=16, batch_size=16)), "dqn": (DQN, dict(buffer_size=100, learning_starts=0))}[algo]
    model = cls("MlpPolicy", env, seed=0, device="cpu", policy_kwargs={"net_arch": [16, 8]}, **kw)
    mean, var = cache_obs_stats(cache, 50.0, mode)
    pol = SB3Exit(model, cache.num_layers, 50.0, mean, var, obs=mode)
    pol.threshold = gap_threshold(pol.exit_probs(cache.states, cache.log_probs)[:, :-1])
    check(pol, cache, tmp_path / "thr")
    pol.threshold = None  # the greedy action
    np.testing.assert_array_equal(graph_decisions(pol, cache, tmp_path / "greedy"), pol.exit_mask(cache)[:, :-1])


def test_heuristic_decision_graphs_equal_their_rules(cache, tmp_path):
    lp = np.asarray(cache.log_probs)[:, :-1]
    check(MaxProbExit(gap_threshold(max_prob(lp))), cache, tmp_path / "m")
    check(EntropyExit(gap_threshold(prediction_entropy(lp))), cache, tmp_path / "e")
    check(PatienceExit(1), cache, tmp_path / "p")
    assert not graph_decisions(PatienceExit(0), cache, tmp_path / "p0").any()  # patience 0: never early
    assert OD.decision_modules(StaticExit(2), cache.num_layers, cache.num_classes) is None


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("kind", ["learned", "maxprob", "entropy", "patience-1"])
def test_in_graph_decisions_give_the_evaluators_exits(tiny, tiny_graphs, kind, batch_size, monkeypatch):
    cache, ds = tiny["cache"], tiny["ds"]
    policy = POLICIES[kind](cache)
    ref = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    clf = OnnxEarlyExitClassifier(ref.model, ref.tokenizer, policy, tiny_graphs, decisions="graph")
    assert clf.decision_graphs() is not None

    def no_numpy(*a, **k):
        raise AssertionError("the policy was asked in numpy")

    monkeypatch.setattr(type(policy), "exit_at_layer", no_numpy)
    got = clf.predict(ds["text_a"], ds["text_b"], batch_size=batch_size)
    ev = evaluate(POLICIES[kind](cache), cache)
    np.testing.assert_array_equal(got.exit_layers, ev.exit_layers)
    np.testing.assert_array_equal(got.label_ids, ev.preds)
    assert len(set(got.exit_layers.tolist())) >= 2


def test_decisions_go_into_the_graphs_unless_numpy_is_asked(tiny, tiny_graphs):
    cache = tiny["cache"]
    ref = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], StaticExit(2))

    def dec(kind, **kw):
        return OnnxEarlyExitClassifier(ref.model, ref.tokenizer, POLICIES[kind](cache), tiny_graphs,
                                       **kw).decision_graphs()

    assert dec("learned") is not None and dec("maxprob") is not None
    assert dec("learned", decisions="numpy") is None and dec("maxprob", decisions="numpy") is None
    assert dec("static-2") is None  # reads no outputs: nothing to decide in a graph
    with pytest.raises(ValueError, match="decisions must be one of"):
        dec("learned", decisions="gpu")


def test_decision_graphs_are_cached_per_policy_and_rebuilt_when_edited(cache, tmp_path, monkeypatch):
    pol = learned(cache, "confidence", False)
    made = []
    real = OD.export_decisions
    monkeypatch.setattr(OD, "export_decisions", lambda *a: made.append(1) or real(*a))
    mods = OD.decision_modules(pol, cache.num_layers, cache.num_classes)
    a = OD.ensure_decisions(tmp_path, mods, cache.hidden_size)
    assert OD.ensure_decisions(tmp_path, mods, cache.hidden_size) == a and len(made) == 1  # cached
    (a / "decide_1.onnx").write_bytes((a / "decide_1.onnx").read_bytes() + b"\0")  # edited on disk
    assert OD.ensure_decisions(tmp_path, mods, cache.hidden_size) == a and len(made) == 2  # rebuilt
    check(pol, cache, tmp_path)
    pol.threshold += 1e-3  # another threshold: other graphs, in another folder
    b = OD.ensure_decisions(tmp_path, OD.decision_modules(pol, cache.num_layers, cache.num_classes), cache.hidden_size)
    assert b != a and len(made) == 3
    with torch.no_grad():  # other weights at the same threshold: another folder too
        pol.net.w1[0, 0, 0] += 1.0
    c = OD.ensure_decisions(tmp_path, OD.decision_modules(pol, cache.num_layers, cache.num_classes), cache.hidden_size)
    assert c not in (a, b)


@pytest.mark.parametrize("path", ["lean", "torch.onnx.export"])
def test_a_decision_graph_that_differs_from_its_module_is_refused(cache, tmp_path, monkeypatch, path):
    import dataclasses

    if path == "lean":  # a learned decision, written by lean_graph from weights that differ
        pol = learned(cache, "confidence", False)
        real = OD.lean_graph

        def skewed(module):
            spec = module.spec
            (w, b, a), *rest = spec.layers
            bad = dataclasses.replace(spec, layers=[(w + 0.5, b, a), *rest])
            return real(OD.DecisionModule("spec", module.l, module.L, module.C, mode=module.mode, bound=module.bound,
                                          spec=bad))

        monkeypatch.setattr(OD, "lean_graph", skewed)
    else:  # a heuristic, exported from a module whose threshold differs
        pol = MaxProbExit(float(np.median(np.exp(cache.log_probs.max(-1)))))
        real = torch.onnx.export

        def skewed(module, args, path, **kw):
            m = OD.DecisionModule("maxprob", module.l, module.L, module.C, module.threshold + 0.3)
            return real(m, args, path, **kw)

        monkeypatch.setattr(torch.onnx, "export", skewed)
    mods = OD.decision_modules(pol, cache.num_layers, cache.num_classes)
    with pytest.raises(RuntimeError, match="differs from its torch module"):
        OD.ensure_decisions(tmp_path, mods, cache.hidden_size)
    assert not list(tmp_path.glob("decide-*/decide.json"))  # no record: the next use exports again


@pytest.mark.parametrize("kind", ["learned", "maxprob", "patience-1"])
def test_a_batch_of_one_is_one_call_of_the_chain_graph_with_the_per_layer_paths_exits(tiny, tiny_graphs, kind,
                                                                                    monkeypatch):
    cache, ds = tiny["cache"], tiny["ds"]
    policy = POLICIES[kind](cache)
    ref = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], policy)
    per_layer = OnnxEarlyExitClassifier(ref.model, ref.tokenizer, policy, tiny_graphs, decisions="graph")
    per_layer.chain = False
    want = per_layer.predict(ds["text_a"], ds["text_b"], batch_size=1)
    clf = OnnxEarlyExitClassifier(ref.model, ref.tokenizer, policy, tiny_graphs, decisions="graph")
    dec = clf.decision_graphs()
    calls = []
    real = dec.chain
    monkeypatch.setattr(dec, "chain", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dec, "layer", lambda *a: pytest.fail("a layer graph was called at batch 1"))
    monkeypatch.setattr(dec, "first", lambda *a: pytest.fail("the first graph was called at batch 1"))
    got = clf.predict(ds["text_a"], ds["text_b"], batch_size=1)
    assert len(calls) == len(ds)
    np.testing.assert_array_equal(got.exit_layers, want.exit_layers)
    np.testing.assert_array_equal(got.label_ids, want.label_ids)
    np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got.exit_layers, evaluate(policy, cache).exit_layers)
    assert len(set(got.exit_layers.tolist())) >= 2


class _SpecPolicy:
    """A decision given as a DecisionSpec with VecNormalize's clip (shift, scale, clip), decided in numpy as SB3Exit
    does: the reference for lean_graph's clip window (features that stay inside it, need it, or become constant)."""

    def __init__(self, mode, cache, head, seed=0):
        from agents.policies.stepper import DecisionSpec
        from cee_env.observations import obs_size

        rng = np.random.default_rng(seed)
        self.mode, self.L, self.head = mode, cache.num_layers, head
        d = obs_size(mode, cache.hidden_size, cache.num_layers, cache.num_classes)
        shift, scale = rng.normal(0, 0.3, d), rng.uniform(0.05, 1.0, d)
        shift[0], scale[0] = 5.0, 0.1  # a feature the clip makes constant (its window lies above its range)
        scale[1] = 0.02  # a bounded feature whose range exceeds the window
        out = 1 if head == "sigmoid" else 2
        layers = [(rng.normal(size=(d, 8)), rng.normal(size=8), "tanh"), (rng.normal(size=(8, out)), rng.normal(size=out), "identity")]
        self.spec = DecisionSpec([(w.astype(np.float32), b.astype(np.float32), a) for w, b, a in layers], head, None,
                                 shift=shift.astype(np.float32), scale=scale.astype(np.float32), clip=3.0)
        from tests.test_stepper import stepped

        self.seen = []
        stepped(self, cache)  # (records the scores)
        self.spec.threshold = gap_threshold(np.concatenate(self.seen))

    def _score(self, obs):
        from agents.policies.stepper import MLP

        s = self.spec
        x = np.clip((obs - s.shift) / s.scale, -s.clip, s.clip).astype(np.float32)
        out = MLP(s.layers)(x).astype(np.float64)
        return 1 / (1 + np.exp(-out[:, 0])) if self.head == "sigmoid" else 1 / (1 + np.exp(out[:, 0] - out[:, 1]))

    def decide_obs(self, l, obs):
        sc = self._score(obs)
        if self.spec.threshold is None:
            self.seen.append(sc)
            return sc > 0.5
        return sc > self.spec.threshold

    def stepper(self):
        from agents.policies.stepper import Stepper

        return Stepper(self.mode, self.L, self.decide_obs, 50.0, spec=lambda l: self.spec)

    def exit_mask(self, cache):
        from tests.test_stepper import stepped

        m = stepped(self, cache)
        return np.concatenate([m, np.ones((len(m), 1))], 1).astype(bool)


@pytest.mark.parametrize("mode,head", [("confidence", "softmax"), ("state_confidence", "softmax"),
                                       ("state_probs", "sigmoid")])
def test_lean_graphs_keep_the_clip_where_it_acts(cache, mode, head, tmp_path):
    pol = _SpecPolicy(mode, cache, head)
    mods = OD.decision_modules(pol, cache.num_layers, cache.num_classes)
    graphs = [OD.lean_graph(m) for m in mods]
    assert all(g is not None for g in graphs)
    ops = {n.op_type for n in graphs[-1].graph.node}
    assert {"Max", "Min"} <= ops  # the window is kept (feature 1's range exceeds it)
    assert not {"Softmax", "Sigmoid"} & ops  # the head compares a margin
    if mode == "confidence":  # feature 0 (top1, in [0, 1]) sits below its window [4.7, 5.3]: a constant in the bias
        from onnx import numpy_helper

        w = {i.name: numpy_helper.to_array(i) for i in graphs[0].graph.initializer}["w0"]
        assert not w[0].any() and w[1].any()
    check(pol, cache, tmp_path)


def test_lean_graph_of_confidence_without_clip_needs_few_nodes(cache):
    pol = learned(cache, "confidence", False)
    mods = OD.decision_modules(pol, cache.num_layers, cache.num_classes)
    first, later = (len(OD.lean_graph(m).graph.node) for m in (mods[0], mods[1]))
    assert first < later <= 30  # layer 1 folds the (constant) history into the bias


def test_the_known_exit_chain_runs_the_layers_up_to_the_exit_it_is_told(tiny, tiny_graphs):
    g, ds = tiny_graphs, tiny["ds"]
    ref = EarlyExitClassifier.from_checkpoint(tiny["ckpt"], StaticExit(1))
    known = OD.KnownExitChain(g)
    for text in ds["text_a"][:3]:
        inp = {k: v.numpy() for k, v in next(iter(ref.batches(ref.tokenize([text]), 1)))[1].items()}
        hidden, _, logp, *ctx = g.first(**inp)
        for k in range(1, g.num_layers + 1):
            if k > 1:
                hidden, _, logp = g.layer(k - 1, hidden, inp["attention_mask"], ctx)
            got, layer = known.run(k, **inp)
            assert layer == k
            np.testing.assert_allclose(got, logp, atol=1e-5)
    with pytest.raises(ValueError, match="an exit layer in 1.."):
        known.run(g.num_layers + 1, **inp)
