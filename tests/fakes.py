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
        if attention_mask is not None:  # (B, S) or, 4-D, (B or 1, 1, q, S): either must cover cache and new tokens
            assert attention_mask.shape in ((batch, past + q), (batch, 1, q, past + q), (1, 1, q, past + q))
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


class ContextLM(nn.Module):
    """next token = rule(context), the context of every fed slot rebuilt from the slots the attention lets it see
    (the cache stores each slot's token and position), in position order: a wrong mask, a wrong position or a
    wrong cache slot reaches the output. `rule` gets the tokens when their positions run 0, 1, ..., else None."""

    def __init__(self, rule: Callable[[list[int] | None], int], vocab_size: int = 64):
        super().__init__()
        self.rule, self.vocab_size = rule, vocab_size
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=0, **kwargs):
        batch, q = input_ids.shape
        self.calls.append((batch, q))
        past = past_key_values.get_seq_length()
        slots = torch.stack([input_ids, position_ids.expand(batch, q)], -1).float()[:, None]  # (B, 1, q, 2)
        keys, _ = past_key_values.update(slots, slots, layer_idx=0)  # (B, 1, past + q, 2)
        causal = torch.ones(q, past + q, dtype=torch.bool).tril(past)  # slot past + i sees slots <= past + i
        if attention_mask is None:
            allowed = causal.expand(batch, q, past + q)
        elif attention_mask.dim() == 2:
            allowed = causal & attention_mask[:, None, :].bool()
        else:  # additive 4-D: 0 attends
            allowed = (attention_mask[:, 0] == 0).expand(batch, q, past + q)
        predicted = torch.zeros(batch, q, dtype=torch.long)
        for b in range(batch):
            for i in range(q):
                seen = keys[b, 0][allowed[b, i]]
                seen = seen[seen[:, 1].argsort()].long().tolist()
                ordered = [pos for _, pos in seen] == list(range(len(seen)))
                predicted[b, i] = self.rule([tok for tok, _ in seen] if ordered else None) % self.vocab_size
        logits = F.one_hot(predicted, self.vocab_size).float()
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)


def scripted(prompt: list[int], truth: list[int], wrong: int = 63) -> ContextLM:
    """Continues `prompt` with `truth` (then `wrong` forever); any other context gets `wrong`."""
    def rule(context):
        done = len(context or []) - len(prompt)
        if context is None or context[: len(prompt)] != prompt or context[len(prompt):] != truth[:done]:
            return wrong
        return truth[done] if done < len(truth) else wrong
    return ContextLM(rule)
