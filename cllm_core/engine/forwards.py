"""The Jacobi loop's model call and cache: where a batch of rows at different progress meets the framework.

Each pass feeds every row a different number of tokens (its last token and its guess) on top of a cache whose
rows hold different numbers of committed tokens. Two ways hold such a batch; both return greedy predictions,
never logits, so no vocabulary-sized padded tensor is built.

- `PackedForward` feeds the rows' tokens as one packed sequence, so the linear layers (most of a pass) see no
  padding, and keeps each row's K/V as a dense prefix of its own slots in one buffer per layer. A registered
  attention function unpacks the queries per row for transformers' SDPA and packs its output back: the
  variable-length attention that flash-attention's varlen kernels give on a GPU, here on any device. A row keeps
  exactly its committed tokens' slots, so there are no holes and nothing to compact. Models whose attention is
  SDPA over plain layers (no sliding window) take it.
- `PaddedForward` takes any model and cache: rows are padded to the widest, a row's uncommitted slots stay in the
  cache as masked holes, and once gathering each row's live slots would free more than `COMPACT_AT` of the cache,
  it is done (keys keep their rotary positions; position ids count live slots).

Both count the attention pairs and tokens they compute and those a row needed (`DecodeStats.live_share`,
`.fed_share`); passes with branches (4-D masks) are left out of the attention count.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cllm_core.engine.errors import UserError

COMPACT_AT = 0.5
"""A padded cache is compacted before a pass when that frees more than this share of its slots."""
PACK = True
"""Whether models that can take `PackedForward` do (tests and the collection benchmark switch it off)."""
PACK_FROM = 8
"""The fewest rows a batch is packed from. Below it the packed forward's bookkeeping costs more than the padding it
saves: on the demo CLLM (2 CPU cores) it took 0.82-0.87x the padded one's speed at batch 1, 0.89x at 2, 0.96x at 4,
about 1.0x at 8 and 12, 1.06x at 16 and 1.34x at 64."""
REBUILD_AT = 0.75
"""A packed buffer drops its finished rows once fewer than this share of its rows are still decoding."""
PACKED = "cllm_packed_sdpa"  # the attention implementation name registered with transformers
PACKED_DEVICES = ("cpu",)
"""Devices the packed forward runs on. It gives SDPA a dense (rows, 1, width, slots) mask: on a CPU that costs
less than the padding it saves (measured above); on CUDA a dense mask keeps SDPA off its flash and cuDNN kernels
and makes transformers repeat the K/V heads per layer per pass, so CUDA decodes padded until a variable-length
path (flash-attention's varlen, flex attention) is measured there."""


def make_forward(model: nn.Module, device: torch.device, batch: int) -> PaddedForward | PackedForward:
    """The packed forward where the model allows it, on a device of `PACKED_DEVICES`, with `PACK_FROM` rows or
    more, else the padded one. Allowed: SDPA attention (another decode's switch to the packed name counts as SDPA,
    so a decode's path does not depend on timing), one config (a composite model's parts have kernels of their
    own), `logits_to_keep` taken, the weights on one device, and every cache layer a plain full-attention one (no
    sliding window, no extra state)."""
    config = getattr(model, "config", None)
    if (PACK and device.type in PACKED_DEVICES and batch >= PACK_FROM
            and getattr(config, "_attn_implementation", None) in ("sdpa", PACKED)
            and not config.sub_configs and _takes_logits_to_keep(model)
            and len(set((getattr(model, "hf_device_map", None) or {}).values())) <= 1):
        layers = DynamicCache(config=config).layers
        if all(type(layer) is DynamicLayer for layer in layers):
            return PackedForward(model, device, batch, len(layers))
    return PaddedForward(model, device)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class _Counts:
    def __init__(self):
        self.slots = self.live_slots = 0  # attention pairs computed, and those a row needs (not hole or padding)
        self.fed = self.live_fed = 0  # tokens fed (each a pass of the linear layers), and those not padding


class PaddedForward(_Counts):
    """Rows padded to the widest, the cache a `DynamicCache` whose mask (`kv_mask`, (B, S)) marks live slots.

    The mask lives on the host: every decision (compact, crop, which slots to keep) and every count is made there,
    and the device gets copies, so a pass waits on the device only for its predictions (on a GPU each host read of
    a device tensor stalls the queue)."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device
        self.dtype = getattr(model, "dtype", torch.float32)  # of a 4-D attention mask
        self.cache = DynamicCache(config=getattr(model, "config", None))
        self.takes_logits_to_keep = _takes_logits_to_keep(model)
        self.kv_mask = None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """Feed the left-padded prompts (B, L); each row's greedy next token ([] when L is 0)."""
        self.kv_mask = mask.cpu()
        if ids.shape[1] == 0:
            return []
        logits = self._call(ids, self.kv_mask, _positions(self.kv_mask), last_only=True)  # (B, 1, V)
        return logits[:, -1].argmax(-1).tolist()

    def predict(self, fed: torch.Tensor, kind: torch.Tensor, offset: torch.Tensor) -> list[list[int]]:
        """Feed (B, W) tokens: `kind` 0 the last token, j + 1 branch j, -1 padding; `offset` each slot's position
        after the row's last committed token. The greedy token after each slot, on its branch."""
        kind, offset = kind.cpu(), offset.cpu()
        live = self.kv_mask.bool()
        if self.compactable and int(live.sum(-1).max()) < (1 - COMPACT_AT) * live.shape[1]:
            self._compact()
        kv_mask = self.kv_mask
        positions = kv_mask.sum(-1, keepdim=True) + offset  # (B, W)
        self.branched = bool((kind > 1).any())
        mask = (_branch_mask(kv_mask, kind, self.dtype) if self.branched
                else torch.cat([kv_mask, (kind >= 0).to(kv_mask.dtype)], 1))
        return self._call(fed, mask, positions).argmax(-1).tolist()

    def commit(self, kept: torch.Tensor) -> None:
        """Keep in the cache the slots of the last pass that `kept` (B, W) marks; the rest become holes, trailing
        slots no row keeps are cropped (branches: every slot no row keeps is dropped)."""
        kept = kept.to("cpu", self.kv_mask.dtype)
        if self.branched:
            keep = torch.cat([torch.ones(self.kv_mask.shape[1], dtype=torch.bool), kept.bool().any(0)])
            if not keep.all():
                self._keep(keep.nonzero().squeeze(1).to(self.device))
            self.kv_mask = torch.cat([self.kv_mask, kept], 1)[:, keep]
            return
        used = kept.bool().any(0).nonzero()
        width = int(used.max()) + 1 if len(used) else 0
        if kept.shape[1] - width:
            self.cache.crop(-(kept.shape[1] - width))
        self.kv_mask = torch.cat([self.kv_mask, kept[:, :width]], 1)

    @torch.inference_mode()
    def select(self, keep: list[int]) -> None:
        """Keep only these rows (finished rows stop costing compute)."""
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self.kv_mask = self.kv_mask[keep]

    @property
    def compactable(self) -> bool:
        """Whether the cache may be gathered: plain layers only (a sliding window tracks its own length)."""
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    @torch.inference_mode()
    def _call(self, ids, mask, positions, last_only=False):
        """One forward; `mask` and `positions` on the host, where the counts are made, then copied to the device."""
        if mask.dim() == 2:
            queries = mask[:, -ids.shape[1]:].sum(-1)
            self.slots += mask.numel() * ids.shape[1]
            self.live_slots += int((queries * mask.sum(-1)).sum())
            self.fed, self.live_fed = self.fed + ids.numel(), self.live_fed + int(queries.sum())
        kwargs = {"logits_to_keep": 1} if (last_only and self.takes_logits_to_keep) else {}
        # no holes: let the kernel use its causal path; a 4-D mask is the branches' own
        attention_mask = mask if mask.dim() == 4 else None if bool(mask.all()) else mask
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits

    @torch.inference_mode()
    def _keep(self, slots: torch.Tensor) -> None:
        """Keep only these cache slots, in order (notes/decoding.md §3b: `index_select` on every layer)."""
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, slots)
            layer.values = layer.values.index_select(-2, slots)

    @torch.inference_mode()
    def _compact(self) -> None:
        """Gather each row's live slots, in order, to the right end of a cache as wide as the fullest row's; the
        rest is left padding."""
        live = self.kv_mask.bool()
        width = int(live.sum(-1).max())
        order = torch.sort(live.to(torch.int8), dim=-1, stable=True).indices[:, -width:]  # dead slots first
        on_device = order.to(self.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = _gather_slots(layer.keys, on_device), _gather_slots(layer.values, on_device)
        self.kv_mask = self.kv_mask.gather(1, order)


def _gather_slots(states: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, d) -> (B, heads, W, d): each row's slots `order[b]` (B, W), in that order."""
    return states.gather(2, order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1]))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch, as `generate` builds them (pads get a dummy position)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _branch_mask(kv_mask: torch.Tensor, kind: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, past + q) additive mask: every slot sees the cache's kept slots, the last token and the earlier
    slots of its own branch (padding sees only itself and other padding). Additive: eager attention adds a
    boolean mask (notes/decoding.md §3f)."""
    allowed = torch.cat([kv_mask.bool()[:, None, :].expand(-1, kind.shape[1], -1), _own(kind)], -1)
    return torch.zeros(allowed.shape, dtype=dtype, device=kind.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _own(kind: torch.Tensor) -> torch.Tensor:
    """(B, q, q): which fed slots each fed slot sees: the earlier slots of its own branch and the last token."""
    q = kind.shape[1]
    causal = torch.ones(q, q, dtype=torch.bool, device=kind.device).tril()
    return causal & ((kind[:, None, :] == 0) | (kind[:, None, :] == kind[:, :, None]))


@dataclass
class _Layout:
    """One packed forward: where each fed token sits in the padded query grid and in the cache buffer."""

    rows: int  # buffer rows (B)
    width: int  # query slots per row (W)
    q_index: torch.Tensor  # (N,) each packed token's index in the (B * W) query grid
    write: torch.Tensor  # (N,) each packed token's slot in the (B * C) buffer
    mask: torch.Tensor  # (B, 1, W, S) boolean: which of the first S buffer slots each query sees
    calls: int = 0  # attention calls that took this layout, and cache writes (each one per layer, checked)
    writes: int = 0


class _PackedCache:
    """Per layer, keys and values (B, C, heads, d): row b's live slots are 0 .. lengths[b] - 1 (no holes)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0  # C
        self.layout: _Layout | None = None

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


class PackedForward(_Counts):
    """Rows packed into one sequence; each row's cache a dense prefix of its slots (module docstring)."""

    def __init__(self, model: nn.Module, device: torch.device, batch: int, layers: int):
        super().__init__()
        self.model, self.device = model, device
        self.cache, self.layers = _PackedCache(), layers
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # live slots per buffer row
        self.active = torch.arange(batch, device=device)  # the loop's rows -> buffer rows
        self.branched, self.fed_index = False, None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """Feed the left-padded prompts (B, L); each row's greedy next token ([] when nothing is fed)."""
        if not bool(mask.any()):
            return []
        live = mask.bool()
        order = torch.sort(live.to(torch.int8), dim=-1, descending=True, stable=True).indices  # live first
        fed, live = ids.gather(1, order).to(self.device), live.gather(1, order).to(self.device)
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=self.device).tril()
        positions = torch.arange(ids.shape[1], device=self.device).expand_as(fed)
        last = live.sum(-1).cumsum(0) - 1  # each row's last token in the packed sequence
        first = self._run(fed, live, positions, causal.expand(len(ids), -1, -1), logits_to_keep=last)
        self.lengths += live.sum(-1)  # the prompts stay in the cache
        return first.tolist()

    def predict(self, fed: torch.Tensor, kind: torch.Tensor, offset: torch.Tensor) -> list[list[int]]:
        """As `PaddedForward.predict`."""
        fed, kind = fed.to(self.device), kind.to(self.device)
        self.branched = bool((kind > 1).any())
        positions = self.lengths[self.active, None] + offset.to(self.device)
        predicted = self._run(fed, kind >= 0, positions, _own(kind))  # (N,)
        grid = torch.zeros(fed.numel(), dtype=torch.long, device=self.device)
        return grid.index_copy_(0, self.fed_index, predicted).view(fed.shape).tolist()

    @torch.inference_mode()
    def commit(self, kept: torch.Tensor) -> None:
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
    def _run(self, fed, live, positions, own, logits_to_keep=None) -> torch.Tensor:
        """One forward of the loop's rows: `fed` (b, W) tokens, `live` (b, W) the fed ones (a prefix of each
        row), `positions` (b, W), `own` (b, W, W) which fed slots each sees. The greedy token after each fed one
        (or after those `logits_to_keep` picks), packed (N,)."""
        rows, width = len(self.lengths), fed.shape[1]
        queries = torch.zeros(rows, dtype=torch.long, device=self.device).index_put_((self.active,), live.sum(-1))
        self._reserve(int((self.lengths + queries).max()))
        row, col = live.nonzero(as_tuple=True)
        self.fed_index = row * width + col  # (N,) each packed token in the loop's (b * W) grid
        row = self.active[row]
        grid = torch.zeros(rows, width, width, dtype=torch.bool, device=self.device).index_copy_(0, self.active, own)
        mask = _ragged_mask(self.lengths, queries, grid)
        self.cache.layout = layout = _Layout(rows, width, row * width + col,
                                             row * self.cache.capacity + self.lengths[row] + col, mask)
        if not self.branched:
            self.slots += mask.numel()
            self.live_slots += int((queries * (self.lengths + queries)).sum())
        self.fed, self.live_fed = self.fed + len(row), self.live_fed + len(row)
        with _packed_attention(self.model):
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


def _ragged_mask(lengths: torch.Tensor, queries: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """(B, 1, W, S) boolean: row b's W query slots see its `lengths[b]` committed slots, then of the
    `queries[b]` slots it wrote after them those `own` (B, W, W) allows; S = max(lengths + queries)."""
    width = own.shape[1]
    new = torch.arange(int((lengths + queries).max()), device=lengths.device) - lengths[:, None]  # (B, S): fed slot
    sees = own.gather(2, new.clamp(0, width - 1)[:, None, :].expand(-1, width, -1))  # (B, W, S)
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
def _packed_attention(model: nn.Module):
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
