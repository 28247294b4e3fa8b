"""Llama-family decoders (Llama, Mistral, Qwen2, SmolLM2): causal mask, rotary positions, and the
final RMSNorm applied to each layer's states before pooling (its last non-padding token: ``last``)."""
from __future__ import annotations

import torch

from backbones.families import Family, _first


class LlamaFamily(Family):
    model_types = ("llama", "mistral", "qwen2")
    decoder = True

    def layers(self):
        return self.base.layers

    def embed_tokens(self, input_ids, attention_mask, token_type_ids):
        return self.base.embed_tokens(input_ids)

    def context(self, hidden, attention_mask):
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # right padding: real tokens first
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=pos)
        return mask, self.base.rotary_emb(hidden, position_ids=pos), pos

    def run_layer(self, l, hidden, ctx):
        mask, rope, pos = ctx
        return _first(self.layers()[l](hidden, attention_mask=mask, position_embeddings=rope, position_ids=pos))

    def finish(self, hidden):
        return self.base.norm(hidden)
