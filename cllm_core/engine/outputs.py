"""What every decoder returns: sequences shaped like `generate`, the same counts, optional trajectories.

Counting conventions (shared by Jacobi and the baselines, so their figures compare):
- a *forward* is one call of the model; a batched call counts once in `forwards`, and once for every row
  it served in `row_forwards`. The first pass feeds the prompt too (there is no forward of the prompt alone).
- `tokens_per_forward` = new tokens / forwards a row took part in, over all rows.
- *fast-forward* tokens: guess tokens that a pass confirmed, i.e. tokens a pass fixed beyond the one
  every pass is guaranteed (docs/design/cllm_reference.md, "Fast-forwarding and stationary tokens").
- *stationary* tokens: fixed tokens that were already right, unchanged, in the state before the one that
  confirmed them, while an earlier token was still wrong (the same section of docs/design/cllm_reference.md).
Both are counted by `fast_forward_counts` alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


def fast_forward_counts(fixed: int, already_right: Sequence[bool]) -> tuple[int, int]:
    """One pass's (fast-forward, stationary) tokens by the conventions above: the pass fixed `fixed` tokens, one
    of them the token every pass is guaranteed; `already_right[i]` says whether the i-th was already right,
    unchanged, in the state before the one that confirmed it. Jacobi and the reference loop both count here."""
    return max(fixed - 1, 0), sum(already_right[:fixed])


@dataclass
class DecodeStats:
    row_forwards: list[int]
    row_new_tokens: list[int]
    row_fast_forward: list[int]
    row_stationary: list[int]
    forwards: int = 0
    attention_slots: int = 0  # (query, cache slot) pairs the forwards computed
    live_attention_slots: int = 0  # of those, pairs of a real query and a real slot: no hole, no padding
    fed_tokens: int = 0  # tokens the forwards fed (rows x width), each a pass through the linear layers
    live_fed_tokens: int = 0  # of those, a row's own tokens: not padding

    @classmethod
    def empty(cls, batch: int) -> DecodeStats:
        return cls([0] * batch, [0] * batch, [0] * batch, [0] * batch)

    @property
    def new_tokens(self) -> int:
        return sum(self.row_new_tokens)

    @property
    def fast_forward(self) -> int:
        return sum(self.row_fast_forward)

    @property
    def stationary(self) -> int:
        return sum(self.row_stationary)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(sum(self.row_forwards), 1)

    @property
    def live_share(self) -> float:
        """The share of the attention the batch computed that a row needed (1.0: no holes, no padding)."""
        return self.live_attention_slots / self.attention_slots if self.attention_slots else 1.0

    @property
    def fed_share(self) -> float:
        """The share of the tokens fed that were a row's own, not padding: the useful part of the linear layers'
        work, which is most of a pass's where the cache is short."""
        return self.live_fed_tokens / self.fed_tokens if self.fed_tokens else 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "new_tokens": self.new_tokens, "fast_forward": self.fast_forward,
                "stationary": self.stationary, "tokens_per_forward": self.tokens_per_forward,
                "live_share": self.live_share, "fed_share": self.fed_share}


@dataclass(frozen=True)
class BlockTrajectory:
    """One block of `n_tokens` response positions: every state a pass saw, then the fixed point.

    `states[0]` is the initial guess (with the carried token, if any, in front) and `states[-1]` equals
    `fixed_point`; `passes` is how many forwards the block took (0 when the carried token filled it).
    """

    states: list[list[int]]
    fixed_point: list[int]
    passes: int


@dataclass
class DecodeOutput:
    sequences: torch.Tensor  # (B, L + T): the prompt as given, then new tokens padded with pad_token_id
    stats: DecodeStats
    trajectories: list[list[BlockTrajectory]] | None = field(default=None)  # [row][block]

    def response(self, row: int, prompt_len: int) -> list[int]:
        """Row `row`'s new tokens (EOS included where it stopped), without the padding after them."""
        return self.sequences[row, prompt_len: prompt_len + self.stats.row_new_tokens[row]].tolist()


def pad_sequences(input_ids: torch.Tensor, responses: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """Prompt batch + ragged responses -> one (B, L + max T) tensor, finished rows padded, as `generate`."""
    width = max((len(r) for r in responses), default=0)
    out = input_ids.new_full((input_ids.shape[0], width), pad_token_id)
    for row, response in enumerate(responses):
        out[row, : len(response)] = torch.tensor(response, dtype=out.dtype)
    return torch.cat([input_ids, out], dim=1)


def new_tokens(sequences: torch.Tensor, prompt_len: int, eos: frozenset[int]) -> list[list[int]]:
    """The generated part of each row, cut after its first EOS (what `generate` pads after)."""
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


@contextmanager
def count_forwards(model: nn.Module) -> Iterator[list[int]]:
    """Count top-level forward calls of `model` (including those `generate` makes internally)."""
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()
