"""Greedy Jacobi decoding with a KV cache: the one loop that decoding, trajectories and metrics read.

The response is cut into blocks of `n_tokens` positions. A pass feeds, per row, the last committed token
and the block's unconverged tail (the *guess*) on top of the cache, predicts every position at once, and
commits the longest prefix of the guess that the predictions confirm plus the first prediction that
disagreed (it saw a correct context, so it is the greedy token). The rest of the guess is replaced by its
predictions (the Jacobi update) and re-fed next pass. When a whole block is confirmed, the prediction after
its last token is free: it is carried in as the first token of the next block.

Invariant: the cache holds K/V for the prompt and every committed token except the last one (`last`).
Rows of a batch keep their own progress: the surplus slots of a row that committed less stay in the
cache masked out (holes), trailing slots no row needs are cropped, and finished rows leave the batch.
With exact arithmetic the result is the greedy (`generate(do_sample=False)`) output.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache

from cllm_core.inputs import check_model, check_positive, check_prompt, resolve_eos, resolve_pad
from cllm_core.outputs import BlockTrajectory, DecodeOutput, DecodeStats, fast_forward_counts, pad_sequences
from cllm_core.stopping import raise_if_stopped

Init = Literal["repeat", "random"]


@dataclass(frozen=True)
class RowStep:
    """What one pass did for one row."""

    row: int  # index in the input batch
    block: int  # index of the block the pass worked on
    state: tuple[int, ...]  # the block as fed: its committed prefix, then the guess (empty for the prefill)
    prefix: int  # how many tokens of `state` were committed before this pass
    committed: tuple[int, ...]  # tokens this pass fixed, in order (at least one)
    fast_forward: int  # guess tokens the pass confirmed
    stationary: int  # of those, tokens already correct and unchanged in the pass before
    finished: bool  # EOS committed or max_new_tokens reached


@dataclass(frozen=True)
class JacobiStep:
    """One parallel forward pass: the rows it served."""

    index: int  # 0 is the prefill
    rows: tuple[RowStep, ...]


@dataclass
class _Row:
    index: int
    context: list[int]  # prompt without padding, then the response
    prompt_len: int
    rng: random.Random
    block: int = 0
    block_end: int = 0
    guess: list[int] = field(default_factory=list)
    age: list[int] = field(default_factory=list)  # how many passes in a row each guess token was fed unchanged
    finished: bool = False

    @property
    def response(self) -> list[int]:
        return self.context[self.prompt_len :]


def jacobi_steps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    n_tokens: int = 16,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    init: Init = "repeat",
    seed: int | Sequence[int] = 0,
    carry: bool = True,
    lookup: int = 0,
) -> Iterator[JacobiStep]:
    """Yield one `JacobiStep` per forward pass until every row has its EOS or `max_new_tokens` tokens.

    `init` fills a new block's guess: "repeat" the last token, or "random" tokens drawn with replacement
    from the row's context (prompt and response so far), seeded per row by `seed` (int: seed + row).
    `carry` starts each block with the free token the previous pass already fixed (faster decoding); without
    it every block starts from a whole guess, as in the paper's trajectories (and its reference code).
    `lookup` > 0 drafts a new block's guess from the context as prompt lookup does: it begins with what followed
    the latest earlier occurrence of the context's last `lookup`..1 tokens, where there is one, and `init` fills
    the rest. Drafts are verified like any guess, so the output stays the greedy output. (Drafting after every
    pass too, over Jacobi's own update, was measured and dropped: a CLLM's updates are the better guesses, 2.48
    against 3.40 tokens per forward on the demo.) Arguments are checked here, before the first step is asked for.
    """
    return _steps(_setup(model, input_ids, attention_mask, n_tokens, max_new_tokens, eos_token_id, pad_token_id,
                         init, seed, carry, lookup))


def _setup(model, input_ids, attention_mask, n_tokens, max_new_tokens, eos_token_id, pad_token_id, init, seed,
           carry=True, lookup=0):
    """Check the arguments and build the loop's state."""
    check_model(model)
    check_positive("n_tokens", n_tokens)
    check_positive("max_new_tokens", max_new_tokens)
    if init not in ("repeat", "random"):
        raise ValueError(f"init must be 'repeat' or 'random', got {init!r}")
    if lookup < 0:
        raise ValueError(f"lookup must be >= 0 (the longest n-gram drafts are matched on; 0: none), got {lookup}")
    eos = resolve_eos(model, eos_token_id)
    pad = resolve_pad(model, pad_token_id, eos)
    kv_mask = check_prompt(input_ids, attention_mask, pad)
    seeds = [seed + b for b in range(len(input_ids))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(input_ids):
        raise ValueError(f"seed has {len(seeds)} entries for {len(input_ids)} rows; give one per row or an int")
    rows = [
        _Row(b, ids[mask.bool()].tolist(), int(mask.sum()), random.Random(int(s)))
        for b, (ids, mask, s) in enumerate(zip(input_ids, kv_mask, seeds))
    ]
    rule = _Rule(n_tokens, max_new_tokens, eos, init, carry, lookup)
    return _Loop(_Forward(model, input_ids.device), input_ids, kv_mask, rows, pad, rule)


@dataclass(frozen=True)
class _Rule:
    n_tokens: int
    max_new_tokens: int
    eos: frozenset[int]
    init: Init
    carry: bool = True
    lookup: int = 0  # the longest n-gram a new block's draft is matched on (0: no drafts)


@dataclass(frozen=True)
class _Loop:
    """What the loop starts from: the model's forward, the prompts and their mask, the rows, pad, the rule."""

    forward: _Forward
    input_ids: torch.Tensor
    kv_mask: torch.Tensor
    rows: list[_Row]
    pad: int
    rule: _Rule


def _steps(loop: _Loop) -> Iterator[JacobiStep]:
    forward, input_ids, kv_mask, rows, pad, rule = (loop.forward, loop.input_ids, loop.kv_mask, loop.rows, loop.pad,
                                                    loop.rule)
    if rule.carry:  # the prefill fixes the first token, which opens the first block
        logits = forward(input_ids, kv_mask, _positions(kv_mask), last_only=True)  # (B, 1, V)
        first = logits[:, -1].argmax(-1).tolist()
        yield JacobiStep(0, tuple(_commit(row, [tok], [], rule) for row, tok in zip(rows, first)))
    else:  # the prompt's last token is fed with the first block's whole guess, so the prefill stops before it
        if input_ids.shape[1] > 1:
            forward(input_ids[:, :-1], kv_mask[:, :-1], _positions(kv_mask)[:, :-1], last_only=True)
        kv_mask = kv_mask[:, :-1]
        yield JacobiStep(0, tuple(_commit(row, [], [], rule) for row in rows))
    index = 0
    while True:
        raise_if_stopped()  # a stop request ends a collection or decode within one pass
        keep = [b for b, row in enumerate(rows) if not row.finished]
        if not keep:
            return
        if len(keep) < len(rows):  # finished rows stop costing compute
            forward.select(keep)
            kv_mask, rows = kv_mask[keep], [rows[b] for b in keep]
        index += 1
        kv_mask, steps = _pass(forward, rows, kv_mask, pad, rule)
        yield JacobiStep(index, tuple(steps))


def _pass(forward, rows, kv_mask, pad, rule):
    """Feed every row its last token and guess, commit what the predictions confirm, trim the cache."""
    device = kv_mask.device
    width = 1 + max(len(row.guess) for row in rows)
    fed = torch.full((len(rows), width), pad, dtype=torch.long)
    new_mask = torch.zeros((len(rows), width), dtype=kv_mask.dtype)
    for b, row in enumerate(rows):
        fed[b, : 1 + len(row.guess)] = torch.tensor([row.context[-1], *row.guess])
        new_mask[b, : 1 + len(row.guess)] = 1
    new_mask = new_mask.to(device)
    positions = kv_mask.sum(-1, keepdim=True) + torch.arange(width, device=device)  # (B, q)
    logits = forward(fed.to(device), torch.cat([kv_mask, new_mask], 1), positions)  # (B, q, V)
    predictions = logits.argmax(-1).tolist()  # predictions[b][i] is the greedy token after fed[b, : i + 1]

    steps = []
    for b, (row, pred) in enumerate(zip(rows, predictions)):
        guess, age = row.guess, row.age
        state = (*row.response[row.block * rule.n_tokens :], *guess)
        matched = next((i for i, (g, p) in enumerate(zip(guess, pred)) if g != p), len(guess))
        # commit the confirmed prefix and the token after it, unless that token would open the next block uncarried
        take = matched + 1 if rule.carry or matched < len(guess) else matched
        row.guess = pred[matched + 1 : len(guess)]  # the Jacobi update of the unconfirmed tail
        row.age = [a + 1 if p == g else 1 for a, g, p in zip(age[matched + 1 :], guess[matched + 1 :], row.guess)]
        steps.append(_commit(row, pred[:take], age[:matched], rule, state, len(state) - len(guess)))
        new_mask[b, take:] = 0  # the cache keeps every committed token but the last; the rest become holes
    live = [int(m.sum()) for m, row in zip(new_mask, rows) if not row.finished]
    surplus = width - max(live, default=width)
    forward.crop(surplus)
    return torch.cat([kv_mask, new_mask[:, : width - surplus]], 1), steps


def _commit(row: _Row, tokens: list[int], confirmed_age: list[int], rule: _Rule, state=(), prefix=0) -> RowStep:
    """Append tokens up to the first EOS or the budget; open the next block once this one is full."""
    block, committed = row.block, []
    for tok in tokens:
        if len(row.response) >= rule.max_new_tokens:
            break
        row.context.append(tok)
        committed.append(tok)
        if tok in rule.eos:
            row.finished = True
            break
    row.finished = row.finished or len(row.response) >= rule.max_new_tokens
    fast_forward, stationary = fast_forward_counts(len(committed), [age >= 2 for age in confirmed_age])
    if not row.finished and len(row.response) >= row.block_end:
        row.block = len(row.response) // rule.n_tokens  # blocks start at multiples of n_tokens
        row.block_end = min((row.block + 1) * rule.n_tokens, rule.max_new_tokens)
        row.guess = _initial_guess(row, row.block_end - len(row.response), rule)
        row.age = [1] * len(row.guess)
    return RowStep(row.index, block, state, prefix, tuple(committed), fast_forward, stationary, row.finished)


def _initial_guess(row: _Row, size: int, rule: _Rule) -> list[int]:
    draft = lookup_draft(row.context, size, rule.lookup) if rule.lookup else []
    if rule.init == "repeat":
        return draft + [row.context[-1]] * (size - len(draft))
    return draft + row.rng.choices(row.context, k=size - len(draft))  # the reference code's draw when no draft


def lookup_draft(context: list[int], size: int, ngram: int) -> list[int]:
    """Up to `size` tokens that followed the latest earlier occurrence of the context's last k tokens, for the
    longest k <= `ngram` that occurs; [] when none does (prompt lookup's draft, searched from the end)."""
    for k in range(min(ngram, len(context) - 1), 0, -1):
        tail = context[-k:]
        for start in range(len(context) - k - 1, -1, -1):
            if context[start : start + k] == tail:
                return context[start + k : start + k + size]
    return []


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch, as `generate` builds them (pads get a dummy position)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


class _Forward:
    """The model call and its cache: the only place that touches the framework."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.cache = DynamicCache(config=getattr(model, "config", None))
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def __call__(self, ids, mask, positions, last_only=False):
        kwargs = {"logits_to_keep": 1} if (last_only and self.takes_logits_to_keep) else {}
        out = self.model(
            input_ids=ids,
            attention_mask=None if bool(mask.all()) else mask,  # no holes: let the kernel use its causal path
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits

    @torch.inference_mode()
    def crop(self, surplus: int) -> None:
        if surplus:
            self.cache.crop(-surplus)

    @torch.inference_mode()
    def select(self, keep: list[int]) -> None:
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))


def jacobi_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    n_tokens: int = 16,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    init: Init = "repeat",
    seed: int | Sequence[int] = 0,
    carry: bool = True,
    lookup: int = 0,
    return_trajectories: bool = False,
) -> DecodeOutput:
    """Greedy Jacobi decoding shaped like `model.generate`: `out.sequences` is (B, L + T), rows that
    stopped early are padded; `out.stats` counts forwards, tokens, fast-forward and stationary tokens.
    `lookup` > 0: a new block's guess drafted from the context (`jacobi_steps`)."""
    loop = _setup(model, input_ids, attention_mask, n_tokens, max_new_tokens, eos_token_id, pad_token_id, init, seed,
                  carry, lookup)
    batch = len(input_ids)
    stats = DecodeStats.empty(batch)
    responses: list[list[int]] = [[] for _ in range(batch)]
    states: list[dict[int, list[tuple[int, ...]]]] = [{} for _ in range(batch)]
    for step in _steps(loop):
        stats.forwards += 1
        for r in step.rows:
            stats.row_forwards[r.row] += 1
            stats.row_new_tokens[r.row] += len(r.committed)
            stats.row_fast_forward[r.row] += r.fast_forward
            stats.row_stationary[r.row] += r.stationary
            responses[r.row].extend(r.committed)
            if return_trajectories and r.state:
                states[r.row].setdefault(r.block, []).append(r.state)
    sequences = pad_sequences(input_ids, responses, loop.pad)
    trajectories = None
    if return_trajectories:
        trajectories = [_blocks(seen, response, n_tokens) for seen, response in zip(states, responses)]
    return DecodeOutput(sequences, stats, trajectories)


def _blocks(seen: dict[int, list[tuple[int, ...]]], response: list[int], n_tokens: int) -> list[BlockTrajectory]:
    """Group a row's fed states by block and close each with its fixed point (cut at EOS like the response)."""
    blocks = []
    for b in range(0, (len(response) + n_tokens - 1) // n_tokens):
        fixed_point = response[b * n_tokens : (b + 1) * n_tokens]
        states = [list(s[: len(fixed_point)]) for s in seen.get(b, [])]
        passes = len(states)
        if not states or states[-1] != fixed_point:
            states.append(list(fixed_point))
        blocks.append(BlockTrajectory(states, fixed_point, passes))
    return blocks
