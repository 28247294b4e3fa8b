"""Backbone families behind one small adapter: embed, step one layer, finish a state for pooling.

The multi-exit model, the cache builder and early-exit inference call only this interface, so a
new architecture is one short file here. An adapter holds no parameters of its own: it steps the
modules of the Hugging Face base model (``AutoModel``) it was made for, so state-dict keys, DDP
wrapping and ``.to(device)`` are the base model's.

    fam = family_for(base)                       # chosen by base.config.model_type
    hidden, ctx = fam.embed(input_ids, attention_mask, token_type_ids)
    for l in range(fam.num_layers):
        hidden = fam.run_layer(l, hidden, ctx)   # layer l's token states
    ctx = fam.context(hidden, attention_mask)    # again after rows leave the batch

``context`` rebuilds what every layer needs besides the token states (attention mask, relative
position bias, rotary embeddings) from the current batch, so rows can leave it between layers.
``finish`` maps a layer's token states to what pooling reads (identity for encoders; the final
norm for decoders, whose un-normalised middle layers a classifier cannot read as they are).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Family:
    """One architecture family. Subclasses set ``model_types`` (and ``decoder``) and fill in
    :meth:`layers`, :meth:`embed_tokens` and :meth:`run_layer` (and :meth:`context` if their layers
    need more than the bidirectional attention mask)."""

    model_types: tuple[str, ...] = ()
    decoder: bool = False  # decoders pool the last token ("last"), after finish()

    def __init__(self, base: nn.Module) -> None:
        self.base = base

    @property
    def config(self):
        return self.base.config

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        hidden = self.embed_tokens(input_ids, attention_mask, token_type_ids)
        return hidden, self.context(hidden, attention_mask)

    def run_layer(self, l: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _first(out):
    return out[0] if isinstance(out, tuple) else out


from backbones.families.bert import BertFamily  # noqa: E402
from backbones.families.deberta import DebertaV2Family  # noqa: E402
from backbones.families.distilbert import DistilBertFamily  # noqa: E402
from backbones.families.llama import LlamaFamily  # noqa: E402
from backbones.families.mpnet import MPNetFamily  # noqa: E402

FAMILIES: tuple[type[Family], ...] = (BertFamily, DistilBertFamily, MPNetFamily, DebertaV2Family, LlamaFamily)
SUPPORTED = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(base: nn.Module) -> Family:
    """The adapter for a Hugging Face base model, chosen by ``config.model_type``."""
    mt = getattr(getattr(base, "config", None), "model_type", None)
    for f in FAMILIES:
        if mt in f.model_types:
            return f(base)
    raise ValueError(f"model type {mt!r} ({type(base).__name__}) has no multi-exit adapter; supported: "
                     f"{', '.join(SUPPORTED)} (add one in backbones/families/)")


def family_class(model_type: str | None) -> type[Family] | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)
