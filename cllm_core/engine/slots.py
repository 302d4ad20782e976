"""What the Jacobi loop feeds a forward in one pass, in the words both forwards share: each row's fed slots (the
last committed token, then each branch's tokens, then padding, as `Slot` names them), which fed slots each one
sees, and the counts a forward keeps of what it computed."""

from __future__ import annotations

import inspect
from enum import IntEnum

import torch
from torch import nn


class Slot(IntEnum):
    """What one fed slot of a pass holds (the `kind` tensor a forward reads): the row's last committed token, a
    token of branch j (`MAIN + j`; branch 0, Jacobi's own guess, is `MAIN`), or padding."""

    PADDING = -1
    LAST = 0
    MAIN = 1


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward computes logits only where asked (transformers' `logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class PassCounts:
    """What a forward computed and what its rows needed, summed over its passes (`DecodeStats.live_share`,
    `.fed_share`)."""

    def __init__(self):
        self.slots = self.live_slots = 0  # attention pairs computed, and those a row needs (not hole or padding)
        self.fed = self.live_fed = 0  # tokens fed (each a pass of the linear layers), and those not padding


def sees_in_pass(kind: torch.Tensor) -> torch.Tensor:
    """(B, q, q): which fed slots each fed slot sees: the earlier slots of its own branch and the last token."""
    q = kind.shape[1]
    causal = torch.ones(q, q, dtype=torch.bool, device=kind.device).tril()
    return causal & ((kind[:, None, :] == Slot.LAST) | (kind[:, None, :] == kind[:, :, None]))
