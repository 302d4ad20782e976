"""Training batches: items of the trajectory store in, the tensors of one step out.

`make_batch` turns items into the paper's objective's tensors: which state of each block is used, and the paper's
augmentation (correct some wrong tokens after the first error), are drawn from a generator seeded by (seed, step,
slot), so a batch depends only on its step and a resumed run sees the batches it would have. `make_packed_batch`
packs whole responses for Jacobi Forcing (cllm_core/training/forcing.py). `Sampler` is one process's share.

Sequences are right-padded: under causal attention no real token sees a pad, so no attention mask is needed,
and every loss mask is built from lengths (never from `!= pad_token_id`, which breaks when pad == eos).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

from cllm_core.data.samples import TrajectoryData
from cllm_core.runtime.config import FinetuneConfig
from cllm_core.runtime.identity import seed_of
from cllm_core.training import forcing


@dataclass(frozen=True)
class Batch:
    """One step's tensors: B items, S = B * k states (k per item, item-major), T* padded lengths, n the block.

    ar_ids (B, Ta): prompt + AR labels; ar_targets (B, Ta): ar_ids shifted left; ar_mask (B, Ta) bool.
    state_ids (S, Ts): prompt + committed response + a sampled state; target_ids (S, Tt): the same context
    + the consistency target block (the fixed point for GC, the next state for LC).
    block_start (S,): where the block begins in state_ids/target_ids; block_len (S,): its real length.
    states, fixed_points (S, n): the block state fed and its fixed point (padding beyond block_len).
    """

    ar_ids: torch.Tensor
    ar_targets: torch.Tensor
    ar_mask: torch.Tensor
    state_ids: torch.Tensor
    target_ids: torch.Tensor
    block_start: torch.Tensor
    block_len: torch.Tensor
    states: torch.Tensor
    fixed_points: torch.Tensor

    @property
    def states_per_block(self) -> int:
        return len(self.state_ids) // len(self.ar_ids)

    @property
    def tokens(self) -> int:
        return int(self.ar_mask.numel() + self.state_ids.numel())


@dataclass(frozen=True)
class Sampler:
    """The batches of one process: its slots of each step's draw (process k takes slots k*B ... (k+1)*B - 1)."""

    data: TrajectoryData
    config: FinetuneConfig
    labels: dict[int, list[int]] | None = None  # ground-truth AR labels per row; None: the teacher's response
    pad: int = 0
    process: int = 0
    processes: int = 1

    def batch(self, step: int) -> Batch | PackedBatch:
        size, offset = self.config.batch_size, self.process * self.config.batch_size
        per_step = size * self.processes
        if self.config.objective == "jacobi_forcing":  # whole responses, packed
            rows = self.data.trained_rows
            indices = draw_items(size, step, offset, len(rows), self.config.seed, per_step)
            return make_packed_batch(self.data, [rows[i] for i in indices], step, offset, seed=self.config.seed,
                                     window=self.config.noise_window, ar_on_prompt=self.config.ar_on_prompt,
                                     pad=self.pad)
        indices = draw_items(size, step, offset, len(self.data.items), self.config.seed, per_step)
        return make_batch(self.data, indices, step, offset, seed=self.config.seed,
                          local=self.config.consistency == "local", augment=self.config.augment, labels=self.labels,
                          ar_on_prompt=self.config.ar_on_prompt, pad=self.pad,
                          states_per_block=self.config.states_per_block)


def draw_items(count: int, step: int, slot_offset: int, total: int, seed: int, per_step: int | None = None
               ) -> list[int]:
    """Item indices for one step's slots. The draws walk through a permutation of the items seeded per epoch, so
    each epoch sees every item once: slot s of step t is draw (t - 1) * per_step + s of the run (per_step: the
    step's slots over every process, `count` alone). A step's items depend only on the step: resumable."""
    per_step = per_step or count
    draws = [(step - 1) * per_step + slot_offset + slot for slot in range(count)]
    return [_permutation(seed, draw // total, total)[draw % total] for draw in draws]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, total: int) -> tuple[int, ...]:
    order = list(range(total))
    _rng(seed, epoch, "epoch").shuffle(order)
    return tuple(order)


def make_batch(data: TrajectoryData, indices: list[int], step: int, slot_offset: int, *, seed: int,
               local: bool, augment: float, labels: dict[int, list[int]] | None, ar_on_prompt: bool,
               pad: int, states_per_block: int = 1) -> Batch:
    """Tensors for the items `indices`: `states_per_block` states drawn per block (never the fixed point),
    each augmented with probability `augment`, stored item-major after the items' one AR sequence each.
    `labels` replaces the teacher's response as the AR target (row -> token ids)."""
    ar, ar_masks, states_seq, targets_seq, starts, lens, states, fixed = [], [], [], [], [], [], [], []
    n = data.n_tokens
    for slot, index in enumerate(indices):
        row_index, block = data.items[index]
        row = data.rows[row_index]
        rng = _rng(seed, step, slot_offset + slot, "state")
        prompt, response = row["prompt_ids"], row["response_ids"]
        trajectory = row["block_states"][block]
        fixed_point = response[block * n : (block + 1) * n]
        context = prompt + response[: block * n]
        answer = labels[row_index] if labels is not None else response
        ar.append(prompt + answer)
        ar_masks.append([ar_on_prompt] * (len(prompt) - 1) + [True] * len(answer))
        intermediate = range(len(trajectory) - 1)  # any state but the fixed point (the random guess included)
        picks = (rng.sample(intermediate, states_per_block) if states_per_block <= len(intermediate)
                 else rng.choices(intermediate, k=states_per_block))
        for j in picks:
            state = list(trajectory[j])
            if rng.random() < augment:
                state = augment_state(state, fixed_point, rng)
            states_seq.append(context + state)
            targets_seq.append(context + list(trajectory[j + 1] if local else fixed_point))
            starts.append(len(context))
            lens.append(len(fixed_point))
            states.append(state)
            fixed.append(fixed_point)
    ar_ids = _pad(ar, pad)
    return Batch(ar_ids=ar_ids, ar_targets=torch.cat([ar_ids[:, 1:], torch.full_like(ar_ids[:, :1], pad)], 1),
                 ar_mask=_pad(ar_masks, False, torch.bool, ar_ids.shape[1]), state_ids=_pad(states_seq, pad),
                 target_ids=_pad(targets_seq, pad), block_start=torch.tensor(starts), block_len=torch.tensor(lens),
                 states=_pad(states, pad, width=n), fixed_points=_pad(fixed, pad, width=n))


@dataclass(frozen=True)
class PackedBatch:
    """One step of Jacobi Forcing: the step's packed responses (cllm_core.training.forcing) in B rows, right-padded
    to L.

    ids, positions, kind (B, L): tokens, position ids (noisy and clean blocks share theirs; each response's start at
    0), PROMPT/NOISY/CLEAN/PADDING; segment (B, L): which response of its row a token is (-1: padding);
    labels (B, L): the clean-stream token each position predicts (pad where none); ar_mask (B, L) bool:
    where the AR loss counts (response labels, with the prompt's under ar_on_prompt); pairs (K, 3): (row, noisy
    index, clean index) of the counted consistency terms.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    kind: torch.Tensor
    segment: torch.Tensor
    labels: torch.Tensor
    ar_mask: torch.Tensor
    pairs: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())


def make_packed_batch(data: TrajectoryData, rows: list[int], step: int, slot_offset: int, *, seed: int,
                      window: int, ar_on_prompt: bool, pad: int) -> PackedBatch:
    """Tensors for the trajectory rows `rows`, each packed whole (its noise phase drawn from (seed, step, slot)),
    several to a batch row where they fit beside each other (`forcing.fit_rows`)."""
    packed, ar_masks = [], []
    for slot, row_index in enumerate(rows):
        row = data.rows[row_index]
        rng = _rng(seed, step, slot_offset + slot, "noise")
        one = forcing.packed_row(row["prompt_ids"], row["response_ids"], row["block_states"], data.n_tokens, window,
                                 rng)
        last_prompt = len(row["prompt_ids"]) - 1
        ar_masks.append([label >= 0 and (kind == forcing.CLEAN or i == last_prompt or ar_on_prompt)
                         for i, (label, kind) in enumerate(zip(one.labels, one.kind))])
        packed.append(one)
    lines = forcing.fit_rows([len(p.ids) for p in packed])
    columns: dict[str, list[list]] = {name: [] for name in ("ids", "positions", "kind", "segment", "labels", "ar")}
    pairs = []
    for b, line in enumerate(lines):
        for name in columns:
            columns[name].append([])
        for segment, i in enumerate(line):
            one, start = packed[i], len(columns["ids"][b])
            columns["ids"][b] += one.ids
            columns["positions"][b] += one.positions
            columns["kind"][b] += one.kind
            columns["segment"][b] += [segment] * len(one.ids)
            columns["labels"][b] += [pad if label < 0 else label for label in one.labels]
            columns["ar"][b] += ar_masks[i]
            pairs += [(b, start + k, start + f) for k, f in one.pairs]
    ids = _pad(columns["ids"], pad)
    width = ids.shape[1]
    return PackedBatch(ids=ids, positions=_pad(columns["positions"], 0, width=width),
                       kind=_pad(columns["kind"], forcing.PADDING, width=width),
                       segment=_pad(columns["segment"], -1, width=width),
                       labels=_pad(columns["labels"], pad, width=width),
                       ar_mask=_pad(columns["ar"], False, torch.bool, width),
                       pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 3))


def augment_state(state: list[int], fixed_point: list[int], rng: random.Random) -> list[int]:
    """The paper's augmentation: correct len(wrong) // 2 wrong tokens, drawn with replacement from all
    but the first error (which stays, so the state is still intermediate)."""
    wrong = [i for i, (s, f) in enumerate(zip(state, fixed_point)) if s != f]
    state = list(state)
    for i in rng.choices(wrong[1:], k=len(wrong) // 2) if len(wrong) > 1 else []:
        state[i] = fixed_point[i]
    return state


def _rng(*key) -> random.Random:
    return random.Random(seed_of(*key))


def _pad(sequences: list[list], value, dtype=torch.long, width: int | None = None) -> torch.Tensor:
    width = width or max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=dtype)
    for b, sequence in enumerate(sequences):
        out[b, : len(sequence)] = torch.tensor(sequence, dtype=dtype)
    return out
