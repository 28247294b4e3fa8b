"""BERT and the encoders built like it: RoBERTa, ELECTRA (``.embeddings`` + ``.encoder.layer``)."""
from __future__ import annotations

from backbones.families import Family, _first


class BertFamily(Family):
    model_types = ("bert", "roberta", "xlm-roberta", "electra", "camembert")

    def layers(self):
        return self.base.encoder.layer

    def embed_tokens(self, input_ids, attention_mask, token_type_ids):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.base.embeddings(input_ids=input_ids, **kw)
        proj = getattr(self.base, "embeddings_project", None)  # ELECTRA when embedding_size != hidden_size
        return hidden if proj is None else proj(hidden)

    def run_layer(self, l, hidden, ctx):
        out = self.layers()[l](hidden, attention_mask=ctx)
        return _first(out)
