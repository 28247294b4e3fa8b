"""A multi-exit model: a Hugging Face encoder or decoder (any family in :mod:`backbones.families`:
BERT, RoBERTa, ELECTRA, DistilBERT, MPNet, DeBERTa-v2, Llama-family decoders) with an internal
classifier after every layer, and a forward that runs one layer at a time.

State s_l (what the internal classifier at layer l reads, and what the
environment reveals at step l) depends on ``pooling``:

- ``mean``: masked mean of layer l's token states. The default for
  sentence-transformers checkpoints such as all-MiniLM-L6-v2, which were trained
  with mean pooling and whose [CLS] state is nearly empty below the top layer.
- ``cls``: the [CLS] state through one shared BERT pooler (dense + tanh), as in
  the paper and PABEE. The default for plain BERT-style checkpoints.
- ``last``: the last non-padding token's state after the decoder's final norm. The default
  (and the only sensible choice) for decoder-only models, whose tokens see only the past.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from backbones.families import family_class, family_for
from backbones.files import load_tensors, read_json, save_tensors, verify_sha256, write_json
from backbones.paths import DEFAULT_ENCODER, resolve_model

CONFIG_NAME = "multiexit.json"
WEIGHTS_NAME = "model.safetensors"
POOLINGS = ("mean", "cls", "last")


@dataclass
class MultiExitConfig:
    model: str  # the encoder it was built from (name or path), for the record
    num_labels: int
    pooling: str = "mean"
    classifier_dropout: float = 0.1
    max_length: int = 128
    task: str = ""
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.label_names = tuple(self.label_names)


def default_pooling(model_path: str) -> str:
    """``last`` for decoders, ``mean`` for sentence-transformers checkpoints (they ship modules.json),
    else ``cls``."""
    try:
        fam = family_class(AutoConfig.from_pretrained(model_path).model_type)
    except (OSError, ValueError):
        fam = None
    if fam is not None and fam.decoder:
        return "last"
    return "mean" if (Path(model_path) / "modules.json").is_file() else "cls"


class MultiExitEncoder(nn.Module):
    def __init__(self, config: MultiExitConfig, encoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder  # the Hugging Face base model (encoder or decoder); its keys name the weights
        self.family = family_for(encoder)  # how to embed, step one layer and finish a state (no parameters)
        if config.pooling == "last" and not self.family.decoder:
            raise ValueError(f"pooling 'last' is for decoders; {type(encoder).__name__} is an encoder (use mean or cls)")
        if self.family.decoder and config.pooling != "last":
            raise ValueError(f"{type(encoder).__name__} is a decoder: its states must be pooled with 'last', "
                             f"not {config.pooling!r} (a token sees only the tokens before it)")
        hidden = encoder.config.hidden_size
        # The shared pooler of the paper (cls pooling), initialised from the checkpoint's pooler if it has one.
        self.pooler = None
        if config.pooling == "cls":
            self.pooler = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
            src = getattr(encoder, "pooler", None)
            if src is not None and hasattr(src, "dense"):
                self.pooler[0].load_state_dict(src.dense.state_dict())
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # the encoder's own pooler is unused (we pool every layer ourselves)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Dropout(config.classifier_dropout), nn.Linear(hidden, config.num_labels))
            for _ in range(self.num_layers)
        )

    # ----------------------------------------------------------------- building
    @classmethod
    def from_pretrained_encoder(cls, model: str | None, num_labels: int, **kw) -> "MultiExitEncoder":
        """Fresh internal classifiers on top of pretrained encoder weights."""
        path = resolve_model(model)
        kw.setdefault("pooling", default_pooling(path))
        encoder = AutoModel.from_pretrained(path)
        return cls(MultiExitConfig(model=model or DEFAULT_ENCODER, num_labels=num_labels, **kw), encoder)

    @classmethod
    def from_encoder_config(cls, encoder_config, num_labels: int, **kw) -> "MultiExitEncoder":
        """Randomly initialised (tests build tiny models this way)."""
        return cls(MultiExitConfig(model="<config>", num_labels=num_labels, **kw), AutoModel.from_config(encoder_config))

    def save(self, out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """safetensors weights + JSON configs (+ the tokenizer), written atomically per file. The weights'
        sha256 goes into multiexit.json (written after them); NaN/inf weights are refused before any write."""
        out = Path(out_dir)
        sha = save_tensors(out / WEIGHTS_NAME, self.state_dict(), "the multi-exit model's weights")
        self.encoder.config.save_pretrained(out / "encoder")
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "tokenizer")
        write_json(out / CONFIG_NAME, {**asdict(self.config), "sha256": {WEIGHTS_NAME: sha}}, indent=2)

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike) -> "MultiExitEncoder":
        """Load a checkpoint; its weights must match the sha256 in multiexit.json and be finite
        (:class:`~backbones.files.IntegrityError` otherwise)."""
        d = Path(ckpt_dir)
        if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{d} is not a multi-exit checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        cfg = read_config(d)
        state = load_tensors(d / WEIGHTS_NAME, cfg.pop("sha256", {}).get(WEIGHTS_NAME), retrain_hint(d))
        model = cls(MultiExitConfig(**cfg), AutoModel.from_config(AutoConfig.from_pretrained(d / "encoder")))
        model.load_state_dict(state)
        return model.eval()

    # ------------------------------------------------------------ layer by layer
    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers()

    @property
    def num_layers(self) -> int:
        return self.family.num_layers

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        """Embeddings and the context the layers take (attention mask, position bias, ...)."""
        return self.family.embed(input_ids, attention_mask, token_type_ids)

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """The layers' context for this batch (rebuilt after rows leave it)."""
        return self.family.context(hidden, attention_mask)

    def run_layer(self, l: int, hidden: torch.Tensor, layer_mask) -> torch.Tensor:
        """Apply layer ``l`` (0-based) to the token states."""
        return self.family.run_layer(l, hidden, layer_mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, finished: bool = False) -> torch.Tensor:
        """The state the exits read; ``finished``: ``hidden`` already went through the family's ``finish``
        (a decoder's own forward returns its last layer after the final norm)."""
        if self.config.pooling == "cls":
            return self.pooler(hidden[:, 0])
        if self.config.pooling == "last":  # the last non-padding token (either padding side)
            pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            idx = (attention_mask.to(torch.long) * (pos + 1)).argmax(1)
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
            return last if finished else self.family.finish(last)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def classify(self, l: int, pooled: torch.Tensor) -> torch.Tensor:
        return self.heads[l](pooled)

    def forward(self, input_ids, attention_mask, token_type_ids=None, return_states: bool = False):
        """All exits: logits [B, L, C] (and pooled states [B, L, H] if asked)."""
        hidden, mask = self.embed(input_ids, attention_mask, token_type_ids)
        logits, states = [], []
        for l in range(self.num_layers):
            hidden = self.run_layer(l, hidden, mask)
            pooled = self.pool(hidden, attention_mask)
            logits.append(self.classify(l, pooled))
            if return_states:
                states.append(pooled)
        out = torch.stack(logits, 1)
        return (out, torch.stack(states, 1)) if return_states else out


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | None = None) -> torch.device:
    """``device`` (or ``$CEE_DEVICE``, else ``auto``): ``auto`` is CUDA when present, else the CPU."""
    name = device or os.environ.get("CEE_DEVICE") or "auto"
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N); got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device (the default install is the CPU "
                         "build of torch: see the README's 'On a GPU')")
    return torch.device(name)


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """A checkpoint's multiexit.json as a dict (its ``sha256`` entry included)."""
    d = Path(ckpt_dir)
    return read_json(d / CONFIG_NAME, retrain_hint(d))


def retrain_hint(ckpt_dir: str | os.PathLike) -> str:
    return (f"the checkpoint {ckpt_dir} cannot be trusted: restore it from a copy, or delete the folder and "
            "train it again (python -m backbones.train with the flags that made it)")


def weights_sha256(ckpt_dir: str | os.PathLike) -> str:
    """sha256 of a checkpoint's weights, checked against the one recorded in multiexit.json (if any)."""
    d = Path(ckpt_dir)
    recorded = read_config(d).get("sha256", {}).get(WEIGHTS_NAME)
    return verify_sha256(d / WEIGHTS_NAME, recorded, retrain_hint(d))


def load_tokenizer(path_or_ckpt: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A checkpoint's own tokenizer if it saved one, else the encoder's."""
    p = Path(path_or_ckpt)
    tok = AutoTokenizer.from_pretrained(p / "tokenizer" if (p / "tokenizer").is_dir() else resolve_model(str(p)))
    if tok.pad_token is None:  # decoders often have none: pad with end-of-sequence (masked out anyway)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # layers and pooling assume real tokens first
    return tok


def weighted_exit_loss(logits: torch.Tensor, labels: torch.Tensor, objective: str = "eq1") -> torch.Tensor:
    """Stage-1 loss. ``eq1``: sum_l l * CE_l / sum_l l (paper Eq 1-2). ``last``: CE of the last layer only."""
    b, n_layers, c = logits.shape
    ce = nn.functional.cross_entropy(logits.reshape(-1, c), labels.repeat_interleave(n_layers), reduction="none")
    ce = ce.view(b, n_layers).mean(0)
    if objective == "last":
        return ce[-1]
    if objective != "eq1":
        raise ValueError(f"objective must be 'eq1' or 'last', got {objective!r}")
    w = torch.arange(1, n_layers + 1, dtype=ce.dtype, device=ce.device)
    return (w * ce).sum() / w.sum()

