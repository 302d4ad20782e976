"""Tiny models for benchmarks and tests, built offline: random Hugging Face causal LMs of several architectures
from configs (`tiny_model`, token ids only, fp32 and seeded), and a tiny random Llama saved with SmolLM2's tokenizer
as a model directory (`save_tiny_model`).

    python -m benchmarks.tiny_model OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from cllm_core import SMOLLM2, load_tokenizer

VOCAB, EOS, PAD = 96, 2, 0
SPECIAL = {"bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": PAD}


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, **SPECIAL)
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, **SPECIAL)
        model = Qwen2ForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            initializer_range=0.2, **SPECIAL)
        model = GPT2LMHeadModel(config)
    elif arch == "mistral":  # a sliding-window cache (wider than these tests' sequences)
        config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                               initializer_range=0.2, **SPECIAL)
        model = MistralForCausalLM(config)
    else:
        raise ValueError(arch)
    return model.eval()


def prompts(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (3..12 tokens) that contain no special token."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [12, 3, 7, 10][:batch] if batch > 1 else [9]
    ids = torch.full((batch, max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, -length:] = 1
    return ids, mask


def save_tiny_model(out: Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    tokenizer = load_tokenizer(SMOLLM2)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.tiny_model OUT_DIR")
    print(save_tiny_model(Path(sys.argv[1])))
