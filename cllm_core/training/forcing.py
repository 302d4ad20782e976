"""Jacobi Forcing's training sequence (arXiv 2512.14681; docs/design/jacobi_forcing.md): a whole response packed
as `prompt ‖ k_0 ‖ f_0 ‖ k_1 ‖ f_1 …`, each fixed point f_j after a noisy state k_j of the same block.

k_j and f_j share position ids. Attention: the prompt is causal; a noisy block sees the prompt, the earlier
noisy blocks and itself causally; a clean block sees the prompt, the earlier clean blocks and itself causally.
So the clean stream is exactly the AR forward of prompt + response (its logits are the AR loss's and, detached,
the consistency target), and each noisy block is decoded as Jacobi decoding would meet it: after noisy blocks.
The noisy state of block j is the trajectory state whose noise (share of the block from its first wrong token
on) is nearest a progressive schedule over a window of blocks: `linspace(0, 1, window)[(phase + j) % window]`.
The reference starts every sequence at phase 0; here the phase is drawn per draw (seeded by step and slot), so
responses shorter than the window also meet its noisy end, and repeated epochs see every block at every level.

A step's packed responses share rows (`fit_rows`: first fit, longest first, into rows as long as the longest), each
a segment that sees only itself, with its own positions: padding costs what the longest response leaves over,
not what every shorter one does, and the attention stays within a row no longer than one response.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cllm_core.engine.errors import UserError

PROMPT, NOISY, CLEAN, PADDING = 0, 1, 2, 3


def first_wrong(state: list[int], fixed_point: list[int]) -> int:
    """Index of the state's first token that differs from the fixed point (the block's length if none)."""
    return next((i for i, (s, f) in enumerate(zip(state, fixed_point)) if s != f), len(fixed_point))


def noise(state: list[int], fixed_point: list[int]) -> float:
    """The share of the block from the state's first wrong token to its end (0: the fixed point itself)."""
    return (len(fixed_point) - first_wrong(state, fixed_point)) / len(fixed_point)


def noisy_state(trajectory: list[list[int]], fixed_point: list[int], target: float) -> list[int]:
    """The trajectory's state whose noise is nearest `target` (the earliest of equals)."""
    return min(trajectory, key=lambda state: abs(noise(state, fixed_point) - target))


def schedule(blocks: int, window: int, phase: int) -> list[float]:
    """Target noise per block: the progressive schedule linspace(0, 1, window), block j at (phase + j) % window."""
    return [((phase + j) % window) / (window - 1) for j in range(blocks)]


@dataclass(frozen=True)
class Packed:
    """One packed sequence (length L). ids, positions, kind (PROMPT/NOISY/CLEAN); labels: the clean-stream token
    each prompt or clean position predicts (-1 where none: the last token); pairs (K, 2): (noisy, clean) packed
    indices of the same block offset whose consistency term counts: from the block's first wrong token on, as
    the reference counts them, less the response's last token (the reference also counts that one, whose target
    is what would follow the response)."""

    ids: list[int]
    positions: list[int]
    kind: list[int]
    labels: list[int]
    pairs: list[tuple[int, int]]


def pack(prompt: list[int], noisy: list[list[int]], clean: list[list[int]]) -> Packed:
    """`prompt ‖ k_0 ‖ f_0 ‖ …` with shared positions, the AR labels of the clean stream (bridges from one block's
    last token to the next block's first included) and the counted consistency pairs."""
    ids, positions, kind = list(prompt), list(range(len(prompt))), [PROMPT] * len(prompt)
    stream = list(range(len(prompt)))  # packed indices of the clean stream, in order
    pairs = []
    offset = len(prompt)
    for state, fixed_point in zip(noisy, clean):
        size = len(fixed_point)
        if len(state) != size:
            raise UserError(f"a noisy state of {len(state)} tokens for a block of {size}")
        k, f = len(ids), len(ids) + size
        ids += list(state) + list(fixed_point)
        positions += 2 * list(range(offset, offset + size))
        kind += [NOISY] * size + [CLEAN] * size
        stream += range(f, f + size)
        pairs += [(k + i, f + i) for i in range(first_wrong(state, fixed_point), size)]
        offset += size
    labels = [-1] * len(ids)
    for here, after in zip(stream, stream[1:]):
        labels[here] = ids[after]
    pairs = [(k, f) for k, f in pairs if labels[f] >= 0]  # the response's last token predicts nothing to agree on
    return Packed(ids, positions, kind, labels, pairs)


def attention_bias(kind: torch.Tensor, dtype: torch.dtype = torch.float32, segment: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """(B, 1, L, L) additive mask from kind (B, L): 0 where query q may see key k (k <= q, k in q's segment, and k
    is prompt or of q's own kind), the dtype's minimum elsewhere. `segment` (B, L): which packed response of the
    row a token belongs to (None: one per row). Additive, not boolean: eager attention adds a boolean mask.
    Right padding (PADDING, its own segment) sees itself and the padding before it; no real token sees it."""
    length = kind.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=kind.device).tril()
    allowed = causal & ((kind[:, None, :] == PROMPT) | (kind[:, None, :] == kind[:, :, None]))  # (B, q, k)
    if segment is not None:
        allowed &= segment[:, None, :] == segment[:, :, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=kind.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


def packed_row(prompt: list[int], response: list[int], block_states: list[list[list[int]]], n_tokens: int,
               window: int, rng: random.Random) -> Packed:
    """A trajectory row as one packed sequence: each block's noisy state picked by the schedule at a drawn phase."""
    clean = [response[b * n_tokens : (b + 1) * n_tokens] for b in range(len(block_states))]
    targets = schedule(len(clean), window, rng.randrange(window))
    noisy = [noisy_state(states, fixed_point, target)
             for states, fixed_point, target in zip(block_states, clean, targets)]
    return pack(prompt, noisy, clean)


def fit_rows(lengths: list[int]) -> list[list[int]]:
    """Sequences (by length) packed into rows no longer than the longest: first fit, longest first. Returns each
    row's sequence indices in packing order; deterministic for the same lengths."""
    cap = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((r for r, left in enumerate(room) if lengths[i] <= left), None)
        if fits is None:
            rows.append([i])
            room.append(cap - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    return rows
