"""Fake causal LMs with hand-written logits: the engine's behaviour on them is known exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast


class FakeLM(nn.Module):
    """next token = rule(input_ids, position_ids), one-hot logits; keeps a real DynamicCache in step."""

    def __init__(self, rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], vocab_size: int = 64):
        super().__init__()
        self.rule, self.vocab_size = rule, vocab_size
        self.calls: list[tuple[int, int]] = []  # (rows, tokens) fed per call: what the engine re-feeds

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=0, **kwargs):
        batch, q = input_ids.shape
        self.calls.append((batch, q))
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            assert attention_mask.shape == (batch, past + q), "mask must cover cache and new tokens"
        if past_key_values is not None:
            slots = input_ids[:, None, :, None].float()  # (B, 1, q, 1): the cache stores the tokens themselves
            past_key_values.update(slots, slots, layer_idx=0)
        logits = F.one_hot(self.rule(input_ids, position_ids) % self.vocab_size, self.vocab_size).float()
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)


def constant(token: int = 7) -> FakeLM:
    """Always predicts `token`: a repeat-initialised block is right at once."""
    return FakeLM(lambda ids, pos: torch.full_like(ids, token))


def successor() -> FakeLM:
    """Predicts the input token + 1: every guess is wrong until its predecessor is fixed (worst case)."""
    return FakeLM(lambda ids, pos: ids + 1)


def by_position(sequence: list[int]) -> FakeLM:
    """Predicts sequence[position + 1] whatever the context: the Jacobi update is right after one pass."""
    table = torch.tensor(sequence)
    return FakeLM(lambda ids, pos: table[(pos + 1).clamp(max=len(sequence) - 1)])


def noisy(seed: int = 0) -> FakeLM:
    """Random logits at every call, not even consistent between calls: only the engine's bound holds."""
    generator = torch.Generator().manual_seed(seed)
    return FakeLM(lambda ids, pos: torch.randint(0, 64, ids.shape, generator=generator))
