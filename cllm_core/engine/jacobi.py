"""Greedy Jacobi decoding with a KV cache: the one loop that decoding, trajectories and metrics read.

The response is cut into blocks of `n_tokens` positions. A pass feeds, per row, the last committed token
and the block's unconverged tail (the *guess*) on top of the cache, predicts every position at once, and
commits the longest prefix of the guess that the predictions confirm plus the first prediction that
disagreed (it saw a correct context, so it is the greedy token). The rest of the guess is replaced by its
predictions (the Jacobi update) and re-fed next pass. When a whole block is confirmed, the prediction after
its last token is free: it is carried in as the first token of the next block.

Invariant: after each pass the cache holds K/V for the prompt and every committed token except the last one
(`last`). Before the first it is empty: the first pass feeds the prompt with the first block's guess.
Rows of a batch keep their own progress, each feeding its own number of tokens on top of its own number of cached
ones; finished rows leave the batch. How such a batch meets the model (rows packed into one sequence over a ragged
cache, or padded with holes) is `forwards.py`'s business: the loop sees greedy predictions per fed slot. A row's
progress and what a pass accepts into it are `rows.py`'s; drafts and branches are `drafts.py`'s.
With exact arithmetic the result is the greedy (`generate(do_sample=False)`) output.

Two options recycle work, as Jacobi Forcing's decoder does (docs/design/jacobi_forcing.md), and keep that
guarantee: every token they propose is checked against the greedy prediction before it is committed.
- *Multi-block* (`blocks` > 1): once the current block is mostly solved (`open_at` of it committed or unchanged
  since the pass before), the guess reaches into the next block, which starts converging early.
- *Rejection recycling* (`pool` > 0): the guesses a pass rejected, with their predicted tails, go into a small pool;
  next pass, each entry that holds the newly committed token proposes what followed it there as an extra branch,
  fed in the same forward under a 4-D mask (a branch sees the cache, the last token and itself). The branch that
  confirms most tokens wins; the losers' slots leave the cache.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cllm_core.engine.drafts import best_branch, lookup_draft, recycled_branches, slot_layout
from cllm_core.engine.errors import UserError
from cllm_core.engine.forwards import make_forward
from cllm_core.engine.inputs import check_attention, check_model, check_positive, check_prompt, resolve_eos, resolve_pad
from cllm_core.engine.outputs import BlockTrajectory, DecodeOutput, DecodeStats, pad_sequences
from cllm_core.engine.rows import DecodeRule, Init, RowState, RowStep, accept
from cllm_core.engine.slots import Slot
from cllm_core.engine.stopping import raise_if_stopped


@dataclass(frozen=True)
class JacobiStep:
    """One parallel forward pass: the rows it served."""

    index: int  # from 1: the first pass, which feeds the prompt too
    rows: tuple[RowStep, ...]


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
    blocks: int = 1,
    open_at: float = 0.85,
    pool: int = 0,
    lookup_branch: bool = False,
) -> Iterator[JacobiStep]:
    """Yield one `JacobiStep` per forward pass until every row has its EOS or `max_new_tokens` tokens.

    `init` fills a new block's guess: "repeat" the last token, or "random" tokens drawn with replacement
    from the row's context (prompt and response so far), seeded per row by `seed` (int: seed + row); "none"
    guesses nothing, so every pass feeds the last token alone: greedy AR (`greedy_generate`).
    `carry` starts each block after the first with the free token the previous pass already fixed (faster
    decoding); without it every block starts from a whole guess, as in the paper's trajectories (and its reference
    code). The first block always does: the first pass feeds it with the prompt, in one forward.
    `lookup` > 0 drafts a new block's guess from the context as prompt lookup does: it begins with what followed
    the latest earlier occurrence of the context's last `lookup`..1 tokens, where there is one, and `init` fills
    the rest. Drafts are verified like any guess, so the output stays the greedy output. (Drafting after every
    pass too, over Jacobi's own update, was measured and dropped: a CLLM's updates are the better guesses, 2.48
    against 3.40 tokens per forward on the demo.) `lookup_branch` keeps both: every pass also feeds the lookup
    draft after the last committed token, where there is one unlike the guess, as a second branch beside Jacobi's
    update, and the branch that confirms most is committed; a pass then feeds up to twice the guess.
    `blocks` > 1 lets the guess span up to that many blocks: the next one opens once `open_at` of the last open
    block is committed or unchanged since the pass before (Jacobi Forcing's multi-block decoding, its K and r).
    `pool` > 0 keeps that many rejected guesses and feeds what they hold after the newly committed token as extra
    branches of the next pass (its rejection recycling). A `RowStep.state` is then the current block's part of the
    main branch. Arguments are checked here, before the first step is asked for.
    """
    return _steps(_setup(model, input_ids, attention_mask, n_tokens, max_new_tokens, eos_token_id, pad_token_id,
                         init, seed, carry, lookup, blocks, open_at, pool, lookup_branch))


def _setup(model, input_ids, attention_mask, n_tokens, max_new_tokens, eos_token_id, pad_token_id, init, seed,
           carry=True, lookup=0, blocks=1, open_at=0.85, pool=0, lookup_branch=False):
    """Check the arguments and build the loop's state."""
    check_model(model)
    check_attention(getattr(getattr(model, "config", None), "_attn_implementation", None),
                    f"model {type(model).__name__}")
    check_positive("n_tokens", n_tokens)
    check_positive("max_new_tokens", max_new_tokens)
    if init not in ("repeat", "random", "none"):
        raise UserError(f"init must be 'repeat', 'random' or 'none', got {init!r}")
    if lookup < 0:
        raise UserError(f"lookup must be >= 0 (the longest n-gram drafts are matched on; 0: none), got {lookup}")
    if lookup_branch and not lookup:
        raise UserError("lookup_branch feeds lookup drafts as a branch: set lookup > 0 (the longest n-gram matched)")
    check_positive("blocks", blocks)
    if not 0 < open_at <= 1:
        raise UserError(f"open_at must be in (0, 1] (the share of a block solved before the next opens), "
                        f"got {open_at}")
    if pool < 0:
        raise UserError(f"pool must be >= 0 (rejected guesses kept for recycling; 0: none), got {pool}")
    eos = resolve_eos(model, eos_token_id)
    pad = resolve_pad(model, pad_token_id, eos)
    kv_mask = check_prompt(input_ids, attention_mask, pad)
    seeds = [seed + b for b in range(len(input_ids))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(input_ids):
        raise UserError(f"seed has {len(seeds)} entries for {len(input_ids)} rows; give one per row or an int")
    rows = [
        RowState(b, ids[mask.bool()].tolist(), int(mask.sum()), random.Random(int(s)), pool=deque(maxlen=pool))
        for b, (ids, mask, s) in enumerate(zip(input_ids, kv_mask, seeds))
    ]
    rule = DecodeRule(n_tokens, max_new_tokens, eos, init, carry, lookup, blocks, math.ceil(open_at * n_tokens),
                      pool, lookup_branch)
    return DecodeLoop(make_forward(model, input_ids.device, len(rows)), input_ids, kv_mask, rows, pad, rule)


@dataclass(frozen=True)
class DecodeLoop:
    """What the loop starts from: the model's forward, the prompts and their mask, the rows, pad, the rule."""

    forward: object  # forwards.PackedForward or .PaddedForward
    input_ids: torch.Tensor
    kv_mask: torch.Tensor
    rows: list[RowState]
    pad: int
    rule: DecodeRule


def _steps(loop: DecodeLoop) -> Iterator[JacobiStep]:
    forward, rows, pad, rule = loop.forward, loop.rows, loop.pad, loop.rule
    # The first block opens with a whole guess after the prompt, and the first pass feeds the prompt with it, in one
    # forward: a forward of the prompt alone (a prefill) would cost about a pass to fix one token.
    forward.prefill(loop.input_ids[:, :-1], loop.kv_mask[:, :-1])
    for row in rows:
        accept(row, [], [], rule)
    index = 0
    while True:
        raise_if_stopped()  # a stop request ends a collection or decode within one pass
        keep = [b for b, row in enumerate(rows) if not row.finished]
        if not keep:
            return
        if len(keep) < len(rows):  # finished rows stop costing compute
            forward.select(keep)
            rows = [rows[b] for b in keep]
        index += 1
        yield JacobiStep(index, tuple(_one_pass(forward, rows, pad, rule)))


def _one_pass(forward, rows, pad, rule) -> list[RowStep]:
    """Feed every row its last token, its guess and any recycled branches; commit what the predictions confirm on
    the branch that confirms most; keep in the cache only the slots of committed tokens."""
    guesses = [until_eos(row.guess, rule.eos) for row in rows]  # what follows a guessed EOS is not fed
    branches = [[guess, *recycled_branches(row.context[-1], guess, row.pool)] if rule.pool else [guess]
                for row, guess in zip(rows, guesses)]
    if rule.lookup_branch:
        for row, bs, guess in zip(rows, branches, guesses):
            draft = lookup_draft(row.context, len(guess), rule.lookup)
            branch = draft + guess[len(draft) :]
            if draft and branch not in bs:
                bs.append(branch)
    layouts = [slot_layout(bs) for bs in branches]  # per row: (branch of each slot, position offset of each slot)
    width = max(len(kinds) for kinds, _ in layouts)
    # lists padded to the width, then one tensor each (a batch has 100s of rows); kind: each slot's Slot
    padding = [width - len(kinds) for kinds, _ in layouts]
    fed = torch.tensor([[row.context[-1], *(tok for branch in bs for tok in branch)] + [pad] * extra
                        for row, bs, extra in zip(rows, branches, padding)])
    kind = torch.tensor([kinds + [Slot.PADDING] * extra for (kinds, _), extra in zip(layouts, padding)])
    offset = torch.tensor([offsets + [0] * extra for (_, offsets), extra in zip(layouts, padding)])
    predictions = forward.predict(fed, kind, offset)  # predictions[b][i]: the greedy token after slot i on its branch

    steps, kept = [], []  # per row: its step, and the slots of this pass the cache keeps
    for row, pred, bs in zip(rows, predictions, branches):
        matched, main, start, branch, chain = best_branch(pred, bs)
        age = row.age if main else [1] * len(branch)
        n_block = row.block_end - row.block * rule.n_tokens
        state = (*row.response[row.block * rule.n_tokens :], *row.guess)[:n_block]
        prefix = len(row.response) - row.block * rule.n_tokens
        # commit the confirmed prefix and the token after it, unless that token would open the next block uncarried
        take = matched + 1 if rule.carry or matched < len(branch) else matched
        if rule.pool and matched < len(branch):
            row.pool.append((*branch, *chain[matched + 1 :]))
        unfed = row.guess[len(branch) :]  # after a guessed EOS: kept as it was, for when that EOS is rejected
        update = chain[matched + 1 : len(branch)]  # the Jacobi update of the unconfirmed tail
        row.age = [a + 1 if p == g else 1 for a, g, p in zip(age[matched + 1 :], branch[matched + 1 :], update)]
        row.guess, row.age = update + unfed, row.age + [1] * len(unfed)
        steps.append(accept(row, chain[:take], age[:matched], rule, state, prefix))
        # the cache keeps every committed token but the last (none of a finished row's); the rest are dropped
        row_kept = [0] * width
        if not row.finished:
            row_kept[0] = int(take > 0)
            row_kept[start : start + take - 1] = [1] * max(take - 1, 0)
        kept.append(row_kept)
    forward.keep_slots(torch.tensor(kept, dtype=torch.bool))
    return steps


def until_eos(guess: list[int], eos: frozenset[int]) -> list[int]:
    """The guess up to and including its first EOS: if the predictions confirm that EOS, the row ends there and
    nothing after it is needed; if they reject it, the tokens after it were predicted after a wrong token anyway.
    On short answers this is a quarter of what a pass would feed (the demo CLLM at n_tokens 32)."""
    end = next((i for i, tok in enumerate(guess) if tok in eos), None)
    return guess if end is None else guess[: end + 1]


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
    blocks: int = 1,
    open_at: float = 0.85,
    pool: int = 0,
    lookup_branch: bool = False,
    return_trajectories: bool = False,
    streamer=None,
) -> DecodeOutput:
    """Greedy Jacobi decoding shaped like `model.generate`: `out.sequences` is (B, L + T), rows that
    stopped early are padded; `out.stats` counts forwards, tokens, fast-forward and stationary tokens.
    `lookup`, `blocks`, `open_at`, `pool`, `lookup_branch`: drafts, multi-block, recycling and lookup branches,
    as in `jacobi_steps`.
    `streamer` (a transformers streamer, one row as theirs take) gets the prompt, then each pass's committed tokens
    as one `put`, then `end()`: text arrives in bursts of several tokens."""
    loop = _setup(model, input_ids, attention_mask, n_tokens, max_new_tokens, eos_token_id, pad_token_id, init, seed,
                  carry, lookup, blocks, open_at, pool, lookup_branch)
    batch = len(input_ids)
    if streamer is not None:
        if batch != 1:
            raise UserError(f"streamer: streams one row; got a batch of {batch} (decode them one by one)")
        streamer.put(input_ids.cpu())
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
            if streamer is not None:
                streamer.put(torch.tensor(r.committed))
    if streamer is not None:
        streamer.end()
    stats.attention_slots, stats.live_attention_slots = loop.forward.slots, loop.forward.live_slots
    stats.fed_tokens, stats.live_fed_tokens = loop.forward.fed, loop.forward.live_fed
    sequences = pad_sequences(input_ids, responses, loop.pad)
    trajectories = None
    if return_trajectories:
        trajectories = [_block_trajectories(seen, response, n_tokens) for seen, response in zip(states, responses)]
    return DecodeOutput(sequences, stats, trajectories)


def _block_trajectories(seen: dict[int, list[tuple[int, ...]]], response: list[int],
                        n_tokens: int) -> list[BlockTrajectory]:
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


def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    streamer=None,
) -> DecodeOutput:
    """Greedy AR decoding through this loop's own forward and cache: no guess, so every pass feeds each row's last
    token alone and commits its prediction. The AR that Jacobi is timed against: the same forward and per-pass
    bookkeeping, so what makes a pass cheaper makes AR cheaper too (on the demo CLLM it costs what `generate` does,
    1.80 against 1.82 ms a token). Its output is `ar_generate`'s."""
    return jacobi_generate(model, input_ids, attention_mask, n_tokens=max_new_tokens, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, init="none", streamer=streamer)
