"""MPNet: BERT-like layers plus a relative position bias shared by every layer (computed once per
batch shape by the encoder; without it the layers are a different model)."""
from __future__ import annotations

from backbones.families import Family, _first


class MPNetFamily(Family):
    model_types = ("mpnet",)

    def layers(self):
        return self.base.encoder.layer

    def embed_tokens(self, input_ids, attention_mask, token_type_ids):
        return self.base.embeddings(input_ids=input_ids)

    def context(self, hidden, attention_mask):
        return super().context(hidden, attention_mask), self.base.encoder.compute_position_bias(hidden)

    def run_layer(self, l, hidden, ctx):
        mask, bias = ctx
        return _first(self.layers()[l](hidden, mask, bias))
