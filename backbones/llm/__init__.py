"""A decoder-only LLM (SmolLM2-135M-Instruct) with an exit head after every layer.

``model`` loads it, ``data`` turns Alpaca prompts into per-layer hidden states, ``heads``
defines and trains the exit heads (Eq 1; optionally LoRA on the backbone), ``train``
is the stage-1 command (``python -m backbones.llm``).
"""
from backbones.llm.data import (ALPACA_FILE, HELD_OUT, Positions, alpaca_rows, alpaca_sequences, cached_positions,
                                collect_positions, instruction_text, layer_states, layer_states_grad, prompt_ids)
from backbones.llm.heads import ExitHeads, eq1_loss, head_agreement, lora_train, train_heads
from backbones.llm.model import decoder_parts, default_llm_dir, load_llm
from backbones.llm.train import Stage1Args, compare_heads, default_heads_dir, heads_model, stage1

__all__ = [
    "ALPACA_FILE", "HELD_OUT", "Positions", "alpaca_rows", "alpaca_sequences", "cached_positions", "collect_positions",
    "instruction_text", "layer_states", "layer_states_grad", "prompt_ids", "ExitHeads", "eq1_loss", "head_agreement",
    "lora_train", "train_heads", "decoder_parts", "default_llm_dir", "load_llm", "Stage1Args", "compare_heads",
    "default_heads_dir", "heads_model", "stage1",
]
