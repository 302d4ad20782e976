"""Save a tiny random Llama with SmolLM2's tokenizer as a model directory, for benchmarks and tests.

    python -m benchmarks.tiny_model OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cllm_core import SMOLLM2, load_tokenizer


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
