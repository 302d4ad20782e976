"""Tiny random Hugging Face causal LMs built from configs (no hub), fp32 and seeded: benchmarks/tiny_model.py's."""

from benchmarks.tiny_model import EOS, PAD, SPECIAL, VOCAB, prompts, tiny_model

__all__ = ["EOS", "PAD", "SPECIAL", "VOCAB", "prompts", "tiny_model"]
