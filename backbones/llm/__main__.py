"""python -m backbones.llm: stage 1 of the decoder LLM's exit heads (see backbones.llm.train)."""
from backbones.llm.train import main

main()
