"""DistilBERT (``.embeddings`` + ``.transformer.layer``; no token types)."""
from __future__ import annotations

from backbones.families import Family, _first


class DistilBertFamily(Family):
    model_types = ("distilbert",)

    def layers(self):
        return self.base.transformer.layer

    def embed_tokens(self, input_ids, attention_mask, token_type_ids):
        return self.base.embeddings(input_ids)

    def run_layer(self, l, hidden, ctx):
        return _first(self.layers()[l](hidden, ctx))
