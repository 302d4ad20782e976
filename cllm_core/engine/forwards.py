"""The Jacobi loop's model call and cache: where a batch of rows at different progress meets the framework.

Each pass feeds every row a different number of tokens (its last token and its guess) on top of a cache whose
rows hold different numbers of committed tokens. Two ways hold such a batch; both return greedy predictions,
never logits, so no vocabulary-sized padded tensor is built.

- `PackedForward` (packed.py) feeds the rows' tokens as one packed sequence, so the linear layers (most of a pass)
  see no padding, over a ragged cache with no holes. Models whose attention is SDPA over plain layers (no sliding
  window) take it.
- `PaddedForward` takes any model and cache: rows are padded to the widest, a row's uncommitted slots stay in the
  cache as masked holes, and once gathering each row's live slots would free more than `COMPACT_AT` of the cache,
  it is done (keys keep their rotary positions; position ids count live slots).

Both count the attention pairs and tokens they compute and those a row needed (`DecodeStats.live_share`,
`.fed_share`); passes with branches (4-D masks) are left out of the attention count.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cllm_core.engine.packed import PACKED, PackedForward
from cllm_core.engine.slots import PassCounts, Slot, sees_in_pass, takes_logits_to_keep

COMPACT_AT = 0.5
"""A padded cache is compacted before a pass when that frees more than this share of its slots."""
PACK = True
"""Whether models that can take `PackedForward` do (tests and the collection benchmark switch it off)."""
PACK_FROM = 8
"""The fewest rows a batch is packed from. Below it the packed forward's bookkeeping costs more than the padding it
saves: on the demo CLLM (2 CPU cores) it took 0.82-0.87x the padded one's speed at batch 1, 0.89x at 2, 0.96x at 4,
about 1.0x at 8 and 12, 1.06x at 16 and 1.34x at 64."""
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
            and not config.sub_configs and takes_logits_to_keep(model)
            and len(set((getattr(model, "hf_device_map", None) or {}).values())) <= 1):
        layers = DynamicCache(config=config).layers
        if all(type(layer) is DynamicLayer for layer in layers):
            return PackedForward(model, device, batch, len(layers))
    return PaddedForward(model, device)


class PaddedForward(PassCounts):
    """Rows padded to the widest, the cache a `DynamicCache` whose mask (`kv_mask`, (B, S)) marks live slots.

    The mask lives on the host: every decision (compact, crop, which slots to keep) and every count is made there,
    and the device gets copies, so a pass waits on the device only for its predictions (on a GPU each host read of
    a device tensor stalls the queue)."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device
        self.dtype = getattr(model, "dtype", torch.float32)  # of a 4-D attention mask
        self.cache = DynamicCache(config=getattr(model, "config", None))
        self.takes_logits_to_keep = takes_logits_to_keep(model)
        # whether the cache may be gathered: plain layers only (a sliding window tracks its own length)
        self.compactable = all(type(layer) is DynamicLayer for layer in self.cache.layers)
        self.kv_mask = None
        self.pending = None  # the prompts and their mask, until the first pass feeds them (`prefill`)
        self.holes = False  # whether kv_mask has a 0: without, a pass needs no (B, S) mask and no counting over it

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Take the left-padded prompts (B, L) but their last tokens (the first pass feeds those as its LAST slots)
        to feed with the first pass, in one forward with the first guesses: a forward of their own would cost
        about a pass to fix one token. Kept on the host, like every input of a pass until `_forward`."""
        self.pending = (ids.cpu(), mask.cpu())
        self.kv_mask = mask.cpu()[:, :0]

    def predict(self, fed: torch.Tensor, kind: torch.Tensor, offset: torch.Tensor) -> list[list[int]]:
        """Feed (B, W) tokens: `kind` each slot's `Slot` (the last token, branch j as
        MAIN + j, padding); `offset` each slot's position
        after the row's last committed token. The greedy token after each slot, on its branch."""
        kind, offset = kind.cpu(), offset.cpu()
        self.branched = bool((kind > Slot.MAIN).any())
        padded = bool((kind == Slot.PADDING).any())
        if self.pending is not None:
            return self._first(fed, kind, offset, padded)
        if not (self.holes or self.branched or padded):  # batch 1 or rows level: the lean pass
            return self._call_level(fed, offset + self.kv_mask.shape[1]).argmax(-1).tolist()
        live = self.kv_mask.bool()
        if self.compactable and int(live.sum(-1).max()) < (1 - COMPACT_AT) * live.shape[1]:
            self._compact()
        kv_mask = self.kv_mask
        positions = kv_mask.sum(-1, keepdim=True) + offset  # (B, W)
        mask = (_branch_mask(kv_mask, kind, self.dtype) if self.branched
                else torch.cat([kv_mask, (kind != Slot.PADDING).to(kv_mask.dtype)], 1))
        return self._call(fed, mask, positions).argmax(-1).tolist()

    def _first(self, fed, kind, offset, padded) -> list[list[int]]:
        """The first pass: the prompts and the fed slots in one forward, the prompts causal among themselves and the
        fed slots seeing them as they would see the cache; the predictions of the fed slots. The cache is empty until
        this forward fills it (`kv_mask` (B, 0)); afterwards the prompts' mask is its mask."""
        (prompts, mask), width = self.pending, fed.shape[1]
        both, holes = torch.cat([prompts, fed], 1), not bool(mask.all())
        if self.compactable and not (holes or self.branched or padded):  # batch 1, or rows level (a sliding
            # window builds its own mask: the 2-D path below leaves it to transformers)
            positions = torch.cat([torch.arange(mask.shape[1]).expand(len(fed), -1), offset + mask.shape[1]], 1)
            logits = self._call_level(both, positions, keep=width)
        else:
            positions = torch.cat([_positions(mask), mask.sum(-1, keepdim=True) + offset], 1)
            seen = (torch.cat([_prompt_mask(mask, width, self.dtype), _branch_mask(mask, kind, self.dtype)], 2)
                    if self.branched else torch.cat([mask, (kind != Slot.PADDING).to(mask.dtype)], 1))
            logits = self._call(both, seen, positions, keep=width)
        self.pending, self.kv_mask, self.holes = None, mask, holes
        return logits.argmax(-1).tolist()

    def keep_slots(self, kept: torch.Tensor) -> None:
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
        self.holes = self.holes or not bool(kept[:, :width].all())

    @torch.inference_mode()
    def select(self, keep: list[int]) -> None:
        """Keep only these rows (finished rows stop costing compute)."""
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self.kv_mask = self.kv_mask[keep]

    @torch.inference_mode()
    def _call_level(self, ids: torch.Tensor, positions: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """A pass over a cache with no holes and rows with no padding: the causal mask over cache and pass is the
        same for every row, built here as one (1, 1, q, S + q) mask (transformers would build it through its mask
        functions, a tenth of a demo pass) and none for one token; the counts are plain arithmetic. `keep`: the
        last slots whose logits are returned (default: all)."""
        batch, q = ids.shape
        width = self.kv_mask.shape[1] + q
        self.slots, self.live_slots = self.slots + batch * width * q, self.live_slots + batch * width * q
        self.fed, self.live_fed = self.fed + batch * q, self.live_fed + batch * q
        mask = None
        if q > 1:
            mask = torch.zeros(1, 1, q, width, dtype=self.dtype).masked_fill_(
                torch.ones(q, width, dtype=torch.bool).triu_(width - q + 1), torch.finfo(self.dtype).min)
        return self._forward(ids, mask, positions, keep)

    @torch.inference_mode()
    def _call(self, ids, mask, positions, keep=None):
        """One forward; `mask` and `positions` on the host, where the counts are made, then copied to the device.
        `keep`: the last slots whose logits are returned (default: all)."""
        if mask.dim() == 2:
            queries = mask[:, -ids.shape[1]:].sum(-1)
            self.slots += mask.numel() * ids.shape[1]
            self.live_slots += int((queries * mask.sum(-1)).sum())
            self.fed, self.live_fed = self.fed + ids.numel(), self.live_fed + int(queries.sum())
        # no holes: let the kernel use its causal path; a 4-D mask is the branches' own
        return self._forward(ids, mask if mask.dim() == 4 else None if bool(mask.all()) else mask, positions, keep)

    def _forward(self, ids, attention_mask, positions, keep=None):
        """The model on this cache, its inputs copied from the host to the device; the logits of the last `keep`
        slots (default: all), computed only there where the model allows it."""
        kwargs = {"logits_to_keep": keep} if (keep and self.takes_logits_to_keep) else {}
        logits = self.model(input_ids=ids.to(self.device),
                            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                            position_ids=positions.to(self.device), past_key_values=self.cache, use_cache=True,
                            **kwargs).logits
        return logits[:, -keep:] if keep else logits

    @torch.inference_mode()
    def _keep(self, slots: torch.Tensor) -> None:
        """Keep only these cache slots, in order (docs/design/decoding.md, "Keeping cache slots")."""
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


def _prompt_mask(mask: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L + width) additive mask of a first pass's prompt queries: each sees the live prompt slots up to
    itself, none of the `width` fed slots after the prompts; a padding slot sees itself (as in `_branch_mask`, so
    that no query row is all masked)."""
    length = mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)
    allowed = torch.cat([allowed, torch.zeros(len(mask), length, width, dtype=torch.bool)], -1)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _branch_mask(kv_mask: torch.Tensor, kind: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, past + q) additive mask: every slot sees the cache's kept slots, the last token and the earlier
    slots of its own branch (padding sees only itself and other padding). Additive: eager attention adds a
    boolean mask (docs/design/decoding.md, "Masks: additive, not boolean")."""
    allowed = torch.cat([kv_mask.bool()[:, None, :].expand(-1, kind.shape[1], -1), sees_in_pass(kind)], -1)
    return torch.zeros(allowed.shape, dtype=dtype, device=kind.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]
