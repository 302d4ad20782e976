"""The packed forward (forwards.py says when it is chosen): the rows' tokens fed as one packed sequence, so the linear
layers see no padding, with each row's K/V a dense prefix of its own slots in one buffer per layer. A registered
attention function unpacks the queries per row for transformers' SDPA and packs its output back: the
variable-length attention that flash-attention's varlen kernels give on a GPU, here on any device. A row keeps
exactly its committed tokens' slots, so there are no holes and nothing to compact."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cllm_core.engine.errors import UserError
from cllm_core.engine.slots import PassCounts, Slot, sees_in_pass

REBUILD_AT = 0.75
"""A packed buffer drops its finished rows once fewer than this share of its rows are still decoding."""

PACKED = "cllm_packed_sdpa"  # the attention implementation name registered with transformers


@dataclass
class PackLayout:
    """One packed forward: where each fed token sits in the padded query grid and in the cache buffer."""

    rows: int  # buffer rows (B)
    width: int  # query slots per row (W)
    q_index: torch.Tensor  # (N,) each packed token's index in the (B * W) query grid
    write: torch.Tensor  # (N,) each packed token's slot in the (B * C) buffer
    mask: torch.Tensor  # (B, 1, W, S) boolean: which of the first S buffer slots each query sees
    calls: int = 0  # attention calls that took this layout, and cache writes (each one per layer, checked)
    writes: int = 0


class PackedCache:
    """Per layer, keys and values (B, C, heads, d): row b's live slots are 0 .. lengths[b] - 1 (no holes)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0  # C
        self.layout: PackLayout | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the packed (1, heads, N, d) keys and values to their rows' slots; return every row's first S
        slots, (B, heads, S, d)."""
        layout, S = self.layout, self.layout.mask.shape[-1]
        layout.writes += 1
        if layer_idx == len(self.keys):
            shape = (layout.rows, self.capacity, key.shape[1], key.shape[-1])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        for buffer, new in ((self.keys[layer_idx], key), (self.values[layer_idx], value)):
            buffer.view(-1, *buffer.shape[2:]).index_copy_(0, layout.write, new[0].transpose(0, 1))
        return self.keys[layer_idx][:, :S].transpose(1, 2), self.values[layer_idx][:, :S].transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Rows of a packed batch hold different lengths: a model that asks for one cannot be packed."""
        raise UserError("packed decoding does not serve a model that reads its cache's length; decode it with "
                        "attn_implementation: eager (the padded forward) and report it")


class PackedForward(PassCounts):
    """Rows packed into one sequence; each row's cache a dense prefix of its slots (module docstring)."""

    def __init__(self, model: nn.Module, device: torch.device, batch: int, layers: int):
        super().__init__()
        self.model, self.device = model, device
        self.cache, self.layers = PackedCache(), layers
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # live slots per buffer row
        self.active = torch.arange(batch, device=device)  # the loop's rows -> buffer rows
        self.branched, self.fed_index = False, None
        self.pending = None  # the prompts and their mask, until the first pass feeds them (`prefill`)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Take the left-padded prompts (B, L) to feed with the first pass (as `PaddedForward.prefill`)."""
        self.pending = (ids, mask)

    def predict(self, fed: torch.Tensor, kind: torch.Tensor, offset: torch.Tensor) -> list[list[int]]:
        """As `PaddedForward.predict`."""
        fed, kind, offset = fed.to(self.device), kind.to(self.device), offset.to(self.device)
        self.branched = bool((kind > Slot.MAIN).any())
        if self.pending is not None:
            return self._first(fed, kind, offset)
        positions = self.lengths[self.active, None] + offset
        predicted = self._run(fed, kind != Slot.PADDING, positions, sees_in_pass(kind))  # (N,)
        grid = torch.zeros(fed.numel(), dtype=torch.long, device=self.device)
        return grid.index_copy_(0, self.fed_index, predicted).view(fed.shape).tolist()

    def _first(self, fed: torch.Tensor, kind: torch.Tensor, offset: torch.Tensor) -> list[list[int]]:
        """The first pass: each row's live prompt tokens, then its fed slots, as one packed row; the prompt tokens
        see the prompt causally, the fed slots the whole prompt and what `sees_in_pass` allows. The prompts stay in
        the cache; the predictions are the fed slots'."""
        (ids, mask), self.pending = self.pending, None
        live_prompt = mask.bool().to(self.device)
        order = torch.sort(live_prompt.to(torch.int8), dim=-1, descending=True, stable=True).indices  # live first
        length, width = live_prompt.sum(-1, keepdim=True), fed.shape[1]  # (b, 1): each row's live prompt tokens
        cols = torch.arange(ids.shape[1] + width, device=self.device)[None]  # (1, T): a row's prompt, then its pass
        in_prompt, slot = cols < length, (cols - length).clamp(0, width - 1)  # (b, T): each column's fed slot
        both = torch.cat([ids.to(self.device).gather(1, order), fed], 1)  # live prompt tokens first, then the pass
        tokens = both.gather(1, torch.where(in_prompt, cols, ids.shape[1] + slot))
        live = in_prompt | ((cols - length < width) & (kind != Slot.PADDING).gather(1, slot))
        positions = torch.where(in_prompt, cols, length + offset.gather(1, slot))
        within = sees_in_pass(kind)  # (b, W, W) over the pass's slots, spread over the columns
        within = within.gather(1, slot[:, :, None].expand(-1, -1, width)).gather(
            2, slot[:, None, :].expand(-1, cols.shape[1], -1))
        prompt_key = in_prompt[:, None, :]  # (b, 1, T)
        sees = torch.where(in_prompt[:, :, None], (cols[:, None, :] <= cols[:, :, None]) & prompt_key,
                           prompt_key | (~prompt_key & within))
        fed_live = kind != Slot.PADDING
        starts = live.sum(-1).cumsum(0) - live.sum(-1)  # each row's first token in the packed sequence
        picked = (starts[:, None] + length + torch.arange(width, device=self.device))[fed_live]
        predicted = self._run(tokens, live, positions, sees, logits_to_keep=picked)
        row, col = fed_live.nonzero(as_tuple=True)
        self.fed_index = row * width + col
        self.lengths[self.active] += length[:, 0]  # the prompts stay in the cache; the pass's slots follow them
        grid = torch.zeros(fed.numel(), dtype=torch.long, device=self.device)
        return grid.index_copy_(0, self.fed_index, predicted).view(fed.shape).tolist()

    @torch.inference_mode()
    def keep_slots(self, kept: torch.Tensor) -> None:
        """Keep the slots of the last pass that `kept` (B, W) marks: each row's kept slots move to the front of
        what it wrote (they already are there unless a branch other than the first won)."""
        kept = kept.to(self.device)
        rank = kept.cumsum(-1) - 1
        rows, cols = (kept & (rank != torch.arange(kept.shape[1], device=self.device))).nonzero(as_tuple=True)
        if len(rows):
            base = self.active[rows] * self.cache.capacity + self.lengths[self.active[rows]]
            src, dst = base + cols, base + rank[rows, cols]
            for buffer in (*self.cache.keys, *self.cache.values):
                flat = buffer.view(-1, *buffer.shape[2:])
                flat.index_copy_(0, dst, flat.index_select(0, src))
        self.lengths[self.active] += kept.sum(-1)

    @torch.inference_mode()
    def select(self, keep: list[int]) -> None:
        """Keep only these of the loop's rows; the buffer drops the others once they are many."""
        self.active = self.active[torch.tensor(keep, device=self.device)]
        if len(self.active) < REBUILD_AT * len(self.lengths):
            for buffers in (self.cache.keys, self.cache.values):
                buffers[:] = [buffer.index_select(0, self.active) for buffer in buffers]
            self.lengths = self.lengths[self.active]
            self.active = torch.arange(len(self.active), device=self.device)

    @torch.inference_mode()
    def _run(self, fed, live, positions, sees, logits_to_keep=None) -> torch.Tensor:
        """One forward of the loop's rows: `fed` (b, W) tokens, `live` (b, W) the fed ones (a prefix of each
        row), `positions` (b, W), `sees` (b, W, W) which fed slots each sees. The greedy token after each fed one
        (or after those `logits_to_keep` picks), packed (N,)."""
        rows, width = len(self.lengths), fed.shape[1]
        queries = torch.zeros(rows, dtype=torch.long, device=self.device).index_put_((self.active,), live.sum(-1))
        self._reserve(int((self.lengths + queries).max()))
        row, col = live.nonzero(as_tuple=True)
        self.fed_index = row * width + col  # (N,) each packed token in the loop's (b * W) grid
        row = self.active[row]
        grid = torch.zeros(rows, width, width, dtype=torch.bool, device=self.device).index_copy_(0, self.active, sees)
        mask = _ragged_mask(self.lengths, queries, grid)
        self.cache.layout = layout = PackLayout(rows, width, row * width + col,
                                                row * self.cache.capacity + self.lengths[row] + col, mask)
        if not self.branched:
            self.slots += mask.numel()
            self.live_slots += int((queries * (self.lengths + queries)).sum())
        self.fed, self.live_fed = self.fed + len(row), self.live_fed + len(row)
        with packed_attention(self.model):
            out = self.model(input_ids=fed[live][None], position_ids=positions[live][None], attention_mask=mask,
                             past_key_values=self.cache, use_cache=True, cllm_layout=layout,
                             logits_to_keep=0 if logits_to_keep is None else logits_to_keep)
        if not layout.calls == layout.writes == self.layers:
            raise RuntimeError(f"packed decoding does not fit this {type(self.model).__name__}: of its {self.layers} "
                               f"attention layers, {layout.writes} wrote the packed cache and {layout.calls} took the "
                               f"packed layout; decode it with attn_implementation: eager (the padded forward) and "
                               f"report it")
        return out.logits[0].argmax(-1)

    def _reserve(self, slots: int) -> None:
        """Grow every buffer to hold at least `slots` slots per row, by a quarter at least (growth copies it)."""
        if slots <= self.cache.capacity:
            return
        capacity = max(slots, self.cache.capacity + max(64, self.cache.capacity // 4))
        for buffers in (self.cache.keys, self.cache.values):
            buffers[:] = [torch.cat([b, b.new_zeros(b.shape[0], capacity - b.shape[1], *b.shape[2:])], 1)
                          for b in buffers]
        self.cache.capacity = capacity


def _ragged_mask(lengths: torch.Tensor, queries: torch.Tensor, within_pass: torch.Tensor) -> torch.Tensor:
    """(B, 1, W, S) boolean: row b's W query slots see its `lengths[b]` committed slots, then of the
    `queries[b]` slots it wrote after them those `within_pass` (B, W, W) allows; S = max(lengths + queries)."""
    width = within_pass.shape[1]
    new = torch.arange(int((lengths + queries).max()), device=lengths.device) - lengths[:, None]  # (B, S): fed slot
    sees = within_pass.gather(2, new.clamp(0, width - 1)[:, None, :].expand(-1, width, -1))  # (B, W, S)
    sees &= ((new >= 0) & (new < queries[:, None]))[:, None, :]
    sees |= (new < 0)[:, None, :]  # the row's committed slots
    sees[:, :, 0] = True  # a row with nothing cached or fed (an empty prompt) sees something, unused
    return sees[:, None]


def _packed_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA, with the queries of a packed forward unpacked per row and its output packed back;
    a forward without a layout goes to SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = kwargs.pop("cllm_layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    unserved = [name for name in ("sliding_window", "s_aux", "position_bias") if kwargs.get(name) is not None]
    if unserved or getattr(module, "sinks", None) is not None:
        what = ", ".join(unserved) or "sinks"
        raise UserError(f"packed decoding does not serve this {type(module).__name__} ({what}); decode it with "
                        "attn_implementation: eager (the padded forward) and report it")
    layout.calls += 1
    heads, d = query.shape[1], query.shape[-1]
    grid = query.new_zeros(layout.rows * layout.width, heads, d).index_copy_(0, layout.q_index,
                                                                            query[0].transpose(0, 1))
    out, _ = sdpa_attention_forward(module, grid.view(layout.rows, layout.width, heads, d).transpose(1, 2),
                                    key, value, attention_mask, **kwargs)  # (B, W, heads, d)
    return out.reshape(-1, heads, d).index_select(0, layout.q_index)[None], None

_switch = threading.Lock()
_users: dict[int, tuple[object, int]] = {}


@contextmanager
def packed_attention(model: nn.Module):
    """Route the model's attention through `_packed_sdpa` for the duration: counted per config, so concurrent
    decodes of one model share the switch; a forward without a layout meanwhile gets plain SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = model.config
    with _switch:
        if PACKED not in AttentionInterface._global_mapping:
            AttentionInterface.register(PACKED, _packed_sdpa)
            AttentionMaskInterface.register(PACKED, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        current = config._attn_implementation  # the packed name only if another copy of this module holds it
        kept, users = _users.get(id(config), ("sdpa" if current == PACKED else current, 0))
        config._attn_implementation = PACKED
        _users[id(config)] = (kept, users + 1)
    try:
        yield
    finally:
        with _switch:
            kept, users = _users.pop(id(config))
            if users > 1:
                _users[id(config)] = (kept, users - 1)
            else:
                config._attn_implementation = kept
