"""A row of a Jacobi decode: its progress (`RowState`), the rule every row follows (`DecodeRule`), what one pass
did for it (`RowStep`), and how committed tokens are accepted into its response, blocks opened and new guesses
made."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from cllm_core.engine.drafts import lookup_draft
from cllm_core.engine.outputs import fast_forward_counts

Init = Literal["repeat", "random", "none"]


@dataclass(frozen=True)
class RowStep:
    """What one pass did for one row."""

    row: int  # index in the input batch
    block: int  # index of the block the pass worked on
    state: tuple[int, ...]  # the block as fed: its committed prefix, then the guess
    prefix: int  # how many tokens of `state` were committed before this pass
    committed: tuple[int, ...]  # tokens this pass fixed, in order (at least one)
    fast_forward: int  # guess tokens the pass confirmed
    stationary: int  # of those, tokens already correct and unchanged in the pass before
    finished: bool  # EOS committed or max_new_tokens reached


@dataclass
class RowState:
    """One row's progress: its context (prompt, then response), its current block, its guess and the pool."""

    index: int
    context: list[int]  # prompt without padding, then the response
    prompt_len: int
    rng: random.Random
    block: int = 0
    block_end: int = 0
    guess: list[int] = field(default_factory=list)
    age: list[int] = field(default_factory=list)  # how many passes in a row each guess token was fed unchanged
    finished: bool = False
    pool: deque = field(default_factory=deque)  # rejected guesses with their predicted tails (recycling)

    @property
    def response(self) -> list[int]:
        return self.context[self.prompt_len :]


@dataclass(frozen=True)
class DecodeRule:
    """What every row of a decode follows: block size, budget, EOS, guesses, drafts, multi-block and recycling."""

    n_tokens: int
    max_new_tokens: int
    eos: frozenset[int]
    init: Init
    carry: bool = True
    lookup: int = 0  # the longest n-gram a new block's draft is matched on (0: no drafts)
    blocks: int = 1  # the most blocks the guess spans
    open_after: int = 1  # solved tokens of the last open block before the next opens (ceil(open_at * n_tokens))
    pool: int = 0  # rejected guesses kept for recycling
    lookup_branch: bool = False  # every pass also verifies the lookup draft as a branch


def accept(row: RowState, tokens: list[int], confirmed_age: list[int], rule: DecodeRule, state=(), prefix=0) -> RowStep:
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
        if not row.guess:  # with several blocks open, the next one's guess is already there
            row.guess = initial_guess(row.context, row.block_end - len(row.response), rule, row.rng)
            row.age = [1] * len(row.guess)
    if not row.finished and rule.blocks > 1:
        open_blocks(row, rule)
    return RowStep(row.index, block, state, prefix, tuple(committed), fast_forward, stationary, row.finished)


def open_blocks(row: RowState, rule: DecodeRule) -> None:
    """Multi-block: append the next block's guess while the window spans fewer than `rule.blocks` blocks and its
    last open block has `rule.open_after` tokens solved (committed, or fed unchanged in the last two passes)."""
    n = rule.n_tokens
    solved = len(row.response) + next((i for i, a in enumerate(row.age) if a < 2), len(row.age))
    while True:
        end = len(row.response) + len(row.guess)  # a block boundary: blocks open whole
        last_open = (end - 1) // n * n  # where the last open block starts
        if end >= min((row.block + rule.blocks) * n, rule.max_new_tokens) or solved - last_open < rule.open_after:
            return
        size = min(end + n, rule.max_new_tokens) - end
        row.guess = row.guess + initial_guess(row.context + row.guess, size, rule, row.rng)
        row.age = row.age + [1] * size


def initial_guess(text: list[int], size: int, rule: DecodeRule, rng: random.Random) -> list[int]:
    """A new block's guess after `text`: a lookup draft where there is one, then `rule.init`'s filling."""
    draft = lookup_draft(text, size, rule.lookup) if rule.lookup else []
    if rule.init == "none":  # no guess: a pass feeds the last token alone (greedy AR through the loop)
        return draft
    if rule.init == "repeat":
        return draft + [text[-1]] * (size - len(draft))
    return draft + rng.choices(text, k=size - len(draft))  # the reference code's draw when no draft
