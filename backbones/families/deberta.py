"""DeBERTa-v2/v3: disentangled relative attention (relative positions and embeddings shared by the
layers) and an optional convolution after the first layer."""
from __future__ import annotations

from backbones.families import Family, _first


class DebertaV2Family(Family):
    model_types = ("deberta-v2",)

    def layers(self):
        return self.base.encoder.layer

    def embed_tokens(self, input_ids, attention_mask, token_type_ids):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.base.embeddings(input_ids=input_ids, mask=attention_mask, **kw)

    def context(self, hidden, attention_mask):
        enc = self.base.encoder
        return (attention_mask, enc.get_attention_mask(attention_mask), enc.get_rel_pos(hidden),
                enc.get_rel_embedding())

    def run_layer(self, l, hidden, ctx):
        input_mask, mask, rel_pos, rel_emb = ctx
        out = _first(self.layers()[l](hidden, mask, relative_pos=rel_pos, rel_embeddings=rel_emb))
        conv = self.base.encoder.conv
        if l == 0 and conv is not None:
            out = conv(hidden, out, input_mask)
        return out
