"""Drafts a pass verifies besides Jacobi's own update, and how a pass lays out its branches: prompt lookup's draft
from the context, the rejected guesses rejection recycling keeps, the branch that confirms most, and each branch's
slots. Every drafted token is checked against the greedy prediction before it is committed."""

from __future__ import annotations

from collections.abc import Iterable

from cllm_core.engine.slots import Slot


def lookup_draft(context: list[int], size: int, ngram: int) -> list[int]:
    """Up to `size` tokens that followed the latest earlier occurrence of the context's last k tokens, for the
    longest k <= `ngram` that occurs; [] when none does (prompt lookup's draft, searched from the end)."""
    for k in range(min(ngram, len(context) - 1), 0, -1):
        tail = context[-k:]
        for start in range(len(context) - k - 1, -1, -1):
            if context[start : start + k] == tail:
                return context[start + k : start + k + size]
    return []


def recycled_branches(last: int, guess: list[int], pool: Iterable[tuple[int, ...]]) -> list[list[int]]:
    """Extra branches from the pool of rejected guesses (oldest first), newest entry first: what followed the first
    occurrence of the `last` committed token there, filled up to the guess's length with the guess's own tokens;
    none equal to the guess or another."""
    found = []
    for entry in reversed(list(pool)):
        if last not in entry or not guess:
            continue
        after = entry.index(last) + 1
        tail = list(entry[after : after + len(guess)])
        branch = tail + guess[len(tail) :]
        if tail and branch != guess and branch not in found:
            found.append(branch)
    return found


def best_branch(pred: list[int], branches: list[list[int]]) -> tuple[int, bool, int, list[int], list[int]]:
    """The branch that confirms most (the main one, first, on a tie): how many of its tokens the predictions
    confirm, whether it is the main branch, its first slot, its tokens, and its chain of predictions (after the last
    token, then after each of its tokens)."""
    found, start = [], 1
    for j, branch in enumerate(branches):
        chain = [pred[0], *pred[start : start + len(branch)]]
        matched = next((i for i, (g, p) in enumerate(zip(branch, chain)) if g != p), len(branch))
        found.append((matched, -j, start, branch, chain))
        start += len(branch)
    matched, j, start, branch, chain = max(found)
    return matched, j == 0, start, branch, chain


def slot_layout(branches: list[list[int]]) -> tuple[list[int], list[int]]:
    """Slots of one row's pass: the last token, then each branch; each slot's `Slot` and its
    position after the last token (branches share positions)."""
    kinds, offsets = [Slot.LAST], [0]
    for j, branch in enumerate(branches):
        kinds += [Slot.MAIN + j] * len(branch)
        offsets += range(1, len(branch) + 1)
    return kinds, offsets
