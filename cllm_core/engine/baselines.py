"""The decoders Jacobi is measured against, returning the same `DecodeOutput` and counts.

- `ar_generate`: greedy `model.generate`, one forward per new token.
- `lookup_generate`: transformers' prompt-lookup decoding (`prompt_lookup_num_tokens`); transformers runs
  it at batch 1 only, so rows are decoded one after another.
- `reference_jacobi_generate`: the research code's collection algorithm (docs/design/cllm_reference.md, "The
  reference collection loop"): batch 1, no KV cache, the whole context re-encoded every iteration, every block
  guessed from random context tokens and committed whole once it stops changing.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationConfig

from cllm_core.engine.inputs import check_model, check_positive, check_prompt, resolve_eos, resolve_pad
from cllm_core.engine.outputs import (
    BlockTrajectory,
    DecodeOutput,
    DecodeStats,
    count_forwards,
    fast_forward_counts,
    new_tokens,
    pad_sequences,
)


@contextmanager
def _greedy(model: nn.Module, max_new_tokens: int, eos: frozenset[int], pad: int, **extra):
    """Make the model's own generation config greedy, with our EOS set and pad, for one `generate` call.

    It has to be the model's own: `generate` fills fields of a passed config that equal the library
    defaults from the model's, so a passed `eos_token_id=None` would not mean "never stop".
    """
    saved = model.generation_config
    config = copy.deepcopy(saved or GenerationConfig())
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, max_length=None,
                  max_new_tokens=max_new_tokens, eos_token_id=sorted(eos) or None, pad_token_id=pad, **extra)
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
    check_model(model)
    check_positive("max_new_tokens", max_new_tokens)
    eos = resolve_eos(model, eos_token_id)
    pad = resolve_pad(model, pad_token_id, eos)
    return check_prompt(input_ids, attention_mask, pad), eos, pad


@torch.inference_mode()
def ar_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
) -> DecodeOutput:
    """Greedy autoregressive decoding with `model.generate`: the baseline every speedup is relative to."""
    mask, eos, pad = _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    with _greedy(model, max_new_tokens, eos, pad), count_forwards(model) as calls:
        sequences = model.generate(input_ids, attention_mask=mask)
    responses = new_tokens(sequences, input_ids.shape[1], eos)
    lengths = [len(r) for r in responses]
    stats = DecodeStats(lengths, lengths, [0] * len(lengths), [0] * len(lengths), forwards=calls[0])
    return DecodeOutput(pad_sequences(input_ids, responses, pad), stats)


@torch.inference_mode()
def lookup_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    prompt_lookup_num_tokens: int = 10,
    max_matching_ngram_size: int = 2,
) -> DecodeOutput:
    """Prompt-lookup decoding: drafts copied from earlier n-grams, verified in one forward (lossless)."""
    mask, eos, pad = _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    check_positive("prompt_lookup_num_tokens", prompt_lookup_num_tokens)
    stats, responses = DecodeStats.empty(len(input_ids)), []
    for row, (ids, row_mask) in enumerate(zip(input_ids, mask)):
        prompt = ids[row_mask.bool()][None]
        with _greedy(model, max_new_tokens, eos, pad, prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                     max_matching_ngram_size=max_matching_ngram_size), count_forwards(model) as calls:
            sequences = model.generate(prompt, attention_mask=torch.ones_like(prompt))
        response = new_tokens(sequences, prompt.shape[1], eos)[0]
        responses.append(response)
        stats.row_forwards[row] = calls[0]
        stats.row_new_tokens[row] = len(response)
        stats.row_fast_forward[row] = max(len(response) - calls[0], 0)
        stats.forwards += calls[0]
    return DecodeOutput(pad_sequences(input_ids, responses, pad), stats)


@torch.inference_mode()
def reference_jacobi_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    n_tokens: int = 16,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    return_trajectories: bool = False,
) -> DecodeOutput:
    """The research code's Jacobi collection loop, kept as the baseline that collection speedups are
    measured against. Rows run one after another, each seeded with `seed + row`."""
    mask, eos, pad = _prepare(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    check_positive("n_tokens", n_tokens)
    stats, responses, trajectories = DecodeStats.empty(len(input_ids)), [], []
    for row, (ids, row_mask) in enumerate(zip(input_ids, mask)):
        context = ids[row_mask.bool()].tolist()
        prompt_len, rng, blocks = len(context), random.Random(seed + row), []
        while len(context) - prompt_len < max_new_tokens:
            size = min(n_tokens, max_new_tokens - (len(context) - prompt_len))
            states = [rng.choices(context, k=size)]
            while True:
                fed = torch.tensor([context + states[-1]], device=ids.device)  # everything, every iteration
                logits = model(input_ids=fed, use_cache=False).logits
                stats.row_forwards[row] += 1
                update = logits[0, len(context) - 1 : len(context) - 1 + size].argmax(-1).tolist()
                if update == states[-1]:
                    break
                states.append(update)
            fixed_point = states[-1]
            fast_forward, stationary = _confirmed(states, fixed_point)
            stats.row_fast_forward[row] += fast_forward
            stats.row_stationary[row] += stationary
            eos_at = next((i for i, t in enumerate(fixed_point) if t in eos), None)
            cut = size if eos_at is None else eos_at + 1
            context += fixed_point[:cut]
            blocks.append(BlockTrajectory([s[:cut] for s in states], fixed_point[:cut], len(states)))
            if eos_at is not None:
                break
        responses.append(context[prompt_len:])
        stats.row_new_tokens[row] = len(responses[-1])
        stats.forwards += stats.row_forwards[row]
        trajectories.append(blocks)
    return DecodeOutput(pad_sequences(input_ids, responses, pad), stats, trajectories if return_trajectories else None)


def _confirmed(states: list[list[int]], fixed_point: list[int]) -> tuple[int, int]:
    """Fast-forward and stationary counts of one block, from its states (`fast_forward_counts`).

    State j has a correct prefix of c_j tokens: the iteration that produced it fixed c_j - c_(j-1) tokens, and
    each was already right in the state before if that state had it right.
    """
    correct = [next((i for i, (s, f) in enumerate(zip(state, fixed_point)) if s != f), len(fixed_point))
               for state in states]
    counts = [fast_forward_counts(correct[j] - correct[j - 1],
                                  [states[j - 1][i] == fixed_point[i] for i in range(correct[j - 1], correct[j])])
              for j in range(1, len(states))]
    return sum(ff for ff, _ in counts), sum(st for _, st in counts)
