"""Layer stepping per architecture family: stepping the layers one at a time through the adapter gives
the states of the model's own forward (``output_hidden_states``), and early-exit inference on that
backbone gives the evaluator's predictions. Tiny random configs: no downloads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from backbones.families import SUPPORTED, family_for
from backbones.multiexit import MultiExitConfig, MultiExitEncoder

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37,
             max_position_embeddings=64)

CONFIGS = {
    "bert": lambda: tf.BertConfig(**SMALL, type_vocab_size=2),
    "roberta": lambda: tf.RobertaConfig(**SMALL, pad_token_id=1),
    "electra": lambda: tf.ElectraConfig(**SMALL, embedding_size=16),
    "distilbert": lambda: tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=3, n_heads=2, hidden_dim=37,
                                              max_position_embeddings=64),
    "mpnet": lambda: tf.MPNetConfig(**SMALL),
    "deberta-v2": lambda: tf.DebertaV2Config(**SMALL, relative_attention=True, position_buckets=8,
                                             pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                                             conv_kernel_size=3, type_vocab_size=2),
    "llama": lambda: tf.LlamaConfig(**SMALL, num_key_value_heads=1, pad_token_id=0),
}


def batch(n=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i, k in enumerate([t, t - 3, 4][:n]):  # ragged rows, right padding
        mask[i, k:] = 0
        ids[i, k:] = 0
    return ids, mask


def base_model(kind):
    torch.manual_seed(0)
    cfg = CONFIGS[kind]()
    cfg._attn_implementation = "eager"
    return tf.AutoModel.from_config(cfg).eval()


def test_every_supported_family_is_tested():
    assert {family_for(base_model(k)).__class__ for k in CONFIGS} == {type(family_for(base_model(k))) for k in CONFIGS}
    tested = {base_model(k).config.model_type for k in CONFIGS}
    assert {"bert", "roberta", "electra", "distilbert", "mpnet", "deberta-v2", "llama"} <= tested <= set(SUPPORTED)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_stepping_equals_the_models_own_forward(kind):
    base = base_model(kind)
    fam = family_for(base)
    ids, mask = batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hidden, ctx = fam.embed(ids, mask)
        steps = []
        for l in range(fam.num_layers):
            hidden = fam.run_layer(l, hidden, ctx)
            steps.append(hidden)
    assert fam.num_layers == 3 and len(ref) == 4
    real = mask.bool()
    for l in range(fam.num_layers):
        want = ref[l + 1]
        # a decoder's recorded last layer is after its final norm (what ``finish`` applies)
        got = fam.finish(steps[l]) if fam.decoder and l == fam.num_layers - 1 else steps[l]
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_stepping_without_the_family_context_is_a_different_model(kind):
    """The context carries what BERT's call signature leaves out (MPNet's relative position bias,
    DeBERTa's relative embeddings, Llama's rotary positions): dropping it changes the states."""
    if kind in ("bert", "roberta", "electra", "distilbert"):
        pytest.skip("a plain mask is the whole context")
    base = base_model(kind)
    fam = family_for(base)
    ids, mask = batch()
    with torch.no_grad():
        hidden, ctx = fam.embed(ids, mask)
        good = fam.run_layer(0, hidden, ctx)
        layer = fam.layers()[0]
        from transformers.masking_utils import create_bidirectional_mask

        try:
            bad = layer(hidden, attention_mask=create_bidirectional_mask(config=base.config, inputs_embeds=hidden,
                                                                         attention_mask=mask))
        except (TypeError, ValueError, AttributeError, RuntimeError):
            return  # the layer cannot even run on BERT's call signature
        bad = bad[0] if isinstance(bad, tuple) else bad
    assert not torch.allclose(good, bad, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_multi_exit_forward_and_early_exit_inference_agree(kind):
    from agents.inference.early_exit_model import EarlyExitClassifier, full_depth_logits
    from agents.policies.heuristics import MaxProbExit

    base = base_model(kind)
    fam = family_for(base)
    pooling = "last" if fam.decoder else "cls"
    model = MultiExitEncoder(MultiExitConfig(model="<config>", num_labels=3, pooling=pooling,
                                             label_names=("a", "b", "c")), base).eval()
    ids, mask = batch()
    with torch.no_grad():
        logits, states = model(ids, mask, return_states=True)
        assert logits.shape == (3, 3, 3) and states.shape == (3, 3, 32)
        torch.testing.assert_close(full_depth_logits(model, ids, mask), logits[:, -1], atol=1e-5, rtol=1e-4)
        # the model's own forward (a decoder's ends with its final norm) gives the same logits
        torch.testing.assert_close(full_depth_logits(model, ids, mask, plain_forward=True), logits[:, -1],
                                   atol=1e-5, rtol=1e-4)
    logp = torch.log_softmax(logits, -1).numpy()
    rule = MaxProbExit(threshold=float(np.median(np.exp(logp[:, 0]).max(-1))))
    decide = np.ones((3, 3), dtype=bool)  # what the evaluator's exit_mask computes from cached outputs
    for l in range(2):
        decide[:, l] = rule.exit_at_layer(l, states[:, : l + 1].numpy(), logp[:, : l + 1])
    want_exit = decide.argmax(1) + 1
    assert len(set(want_exit)) > 1  # rows leave the batch at different layers
    got_logp, got_exit, _ = EarlyExitClassifier(model, None, rule).classify_batch(ids, mask)
    np.testing.assert_array_equal(got_exit, want_exit)
    for i, e in enumerate(got_exit):
        np.testing.assert_allclose(got_logp[i], logp[i, e - 1], atol=1e-5)


def test_a_decoder_needs_last_pooling_and_an_encoder_refuses_it():
    with pytest.raises(ValueError, match="decoder"):
        MultiExitEncoder(MultiExitConfig(model="<config>", num_labels=2, pooling="mean"), base_model("llama"))
    with pytest.raises(ValueError, match="for decoders"):
        MultiExitEncoder(MultiExitConfig(model="<config>", num_labels=2, pooling="last"), base_model("bert"))


def test_an_unsupported_architecture_is_named():
    base = tf.AutoModel.from_config(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="'gpt2'.*no multi-exit adapter"):
        family_for(base)


# --------------------------------------------------------------------------- the packaged 12-layer MPNet
def _fake_parts(tmp_path, payload: dict[str, bytes]) -> list:
    """A zip laid out like the packaged one (a top folder), split into 3 parts like the five real ones."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in payload.items():
            z.writestr(f"all-mpnet-base-v2/{name}", data)
    blob = buf.getvalue()
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    parts = []
    for i in range(3):
        p = tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}"
        p.write_bytes(blob[cut[i]:cut[i + 1]])
        parts.append(p)
    return parts


def test_mpnet_is_assembled_once_checked_and_rebuilt_when_edited(tmp_runs, tmp_path, monkeypatch):
    from backbones import paths

    parts = _fake_parts(tmp_path, {"config.json": b'{"model_type": "mpnet"}', "model.safetensors": b"w" * 1000,
                                   "desktop.ini": b"junk", "1_Pooling/config.json": b"{}"})
    calls = []
    monkeypatch.setattr(paths, "_mpnet_parts", lambda: calls.append(1) or parts)
    d = paths.resolve_model("all-mpnet-base-v2")
    assert (paths.Path(d) / "model.safetensors").read_bytes() == b"w" * 1000
    assert (paths.Path(d) / "1_Pooling" / "config.json").is_file() and not (paths.Path(d) / "desktop.ini").exists()
    assert paths.resolve_model("sentence-transformers/all-mpnet-base-v2") == d and len(calls) == 1  # once
    (paths.Path(d) / "model.safetensors").write_bytes(b"x" * 1000)  # edited weights: assembled again
    assert paths.resolve_model("all-mpnet-base-v2") == d and len(calls) == 2
    assert (paths.Path(d) / "model.safetensors").read_bytes() == b"w" * 1000


def test_missing_mpnet_parts_name_the_install_command(tmp_runs, monkeypatch):
    from backbones import paths

    monkeypatch.setattr(paths, "MPNET_PARTS", ("no-such-package-part-001",))
    with pytest.raises(FileNotFoundError, match=r"no-such-package-part-001.*pip install -e '\.\[mpnet\]'"):
        paths.resolve_model("all-mpnet-base-v2")


def test_a_damaged_mpnet_zip_is_refused_with_the_reinstall_command(tmp_runs, tmp_path, monkeypatch):
    from backbones import paths

    parts = _fake_parts(tmp_path, {"config.json": b"{}", "model.safetensors": b"w"})
    parts[1].write_bytes(b"garbage")
    monkeypatch.setattr(paths, "_mpnet_parts", lambda: parts)
    with pytest.raises(ValueError, match="force-reinstall"):
        paths.resolve_model("all-mpnet-base-v2")
    assert not (paths.runs_dir() / "models" / "all-mpnet-base-v2").exists()  # nothing half-written


def test_the_model_flag_reaches_the_deployed_checkpoint_and_output_folders(tiny_encoder_dir):
    from backbones.paths import model_suffix
    from backbones.train import TrainConfig, checkpoint_dir

    assert model_suffix(None) == "" and model_suffix("all-MiniLM-L6-v2") == ""
    assert model_suffix("all-mpnet-base-v2") == "-all-mpnet-base-v2" and model_suffix("/x/y/smollm2/") == "-smollm2"
    r = TrainConfig(task="RTE", model=str(tiny_encoder_dir), holdout=0.3, pooling="cls").resolved()
    assert checkpoint_dir(r).name == "RTE-tiny-bert-cls-eq1-s0-holdout0.3"


def test_device_auto_is_the_cpu_here_and_a_missing_gpu_is_named(monkeypatch):
    from backbones.multiexit import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and resolve_device(None).type == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    monkeypatch.setenv("CEE_DEVICE", "cpu")
    assert resolve_device().type == "cpu"


def test_gym_make_with_a_model_trains_and_serves_that_backbone(tmp_runs, tiny_task, tiny_encoder_dir):
    import gymnasium as gym

    import cee_env
    from conftest import TINY_TASK

    env_id = cee_env.register_task_env(TINY_TASK)
    env = gym.make(env_id, split="calib", model=str(tiny_encoder_dir), obs="confidence")
    ckpt = env.unwrapped.cache.meta["checkpoint"]
    assert "tiny-bert" in ckpt and env.unwrapped.num_layers == 2
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
