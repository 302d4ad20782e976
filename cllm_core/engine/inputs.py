"""Argument checks shared by every decoder: one clear error that names the argument, before any forward."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from cllm_core.engine.errors import UserError
from cllm_core.engine.packed import PACKED


def check_model(model: nn.Module) -> None:
    """A decoder needs a causal LM: logits over the vocabulary at every position."""
    if isinstance(model, PreTrainedModel):
        name = type(model).__name__
        if getattr(model.config, "is_encoder_decoder", False):
            raise UserError(f"model: {name} is an encoder-decoder; Jacobi decoding needs a causal LM "
                            "(load it with AutoModelForCausalLM)")
        if not model.can_generate():
            raise UserError(f"model: {name} is not a causal LM (it has no language-model head); "
                            "load it with AutoModelForCausalLM")
    elif not isinstance(model, nn.Module):
        raise UserError(f"model: expected a torch.nn.Module causal LM, got {type(model).__name__}")


MASKED_KERNELS = ("sdpa", "eager")
"""Attention kernels that apply a custom 4-D mask: Jacobi's cache with holes, recycled branches, packed rows and
Jacobi Forcing's packed objective all rely on one. flash_attention_2/3 and the paged kernels take at most a padding
mask and would let a token see what it must not (or crash)."""


def check_attention(implementation: str | None, where: str = "model") -> None:
    """Refuse an attention kernel that cannot apply the masks every CLLM feature needs, before any work. The packed
    forward's name is SDPA underneath: a model shows it while another thread's packed decode runs."""
    if implementation is not None and implementation not in (*MASKED_KERNELS, PACKED):
        raise UserError(f"{where}: attention {implementation!r} does not apply the custom attention masks Jacobi "
                        "decoding and fine-tuning need (a cache with holes, branches, packed rows); use sdpa (the "
                        "default: its fused kernels where a mask allows) or eager")


def check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_eos(model: nn.Module, eos_token_id: int | Iterable[int] | None) -> frozenset[int]:
    """None: the model's generation config; an empty list: never stop early."""
    if eos_token_id is None:
        config = getattr(model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(t) for t in eos_token_id)


def resolve_pad(model: nn.Module, pad_token_id: int | None, eos: frozenset[int]) -> int:
    """The token that fills finished rows, as `generate` does (pad, else the first EOS)."""
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None and eos:
        pad_token_id = min(eos)
    return 0 if pad_token_id is None else int(pad_token_id)


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int) -> torch.Tensor:
    """Validate a (B, L) prompt batch and return its attention mask (all ones when omitted).

    Padding must be on the left, as for `generate` with decoder-only models.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise UserError("input_ids must be a 2-D tensor of shape (batch, prompt_len); "
                        "wrap a single prompt as ids[None]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise UserError(f"input_ids is empty (shape {tuple(input_ids.shape)}); "
                        "every row needs at least one prompt token")
    if attention_mask is None:
        if input_ids.shape[0] > 1 and bool((input_ids[:, 0] == pad_token_id).any()):
            raise UserError(f"input_ids has rows that start with the pad token {pad_token_id} but "
                            "attention_mask is None; pass the attention_mask the tokenizer returned")
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise UserError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                        f"input_ids has {tuple(input_ids.shape)}; they must match")
    mask = attention_mask.to(torch.long)
    if bool((mask.sum(-1) == 0).any()):
        raise UserError("input_ids has an empty prompt: a row of attention_mask is all zeros")
    if bool((mask[:, -1] == 0).any()):
        raise UserError("attention_mask pads on the right; decoder-only models need left padding "
                        "(tokenizer.padding_side = 'left')")
    if bool((mask.diff(dim=-1) < 0).any()):
        raise UserError("attention_mask has holes inside a prompt; only left padding is supported")
    return mask

