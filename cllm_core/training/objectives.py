"""The two fine-tuning objectives. The paper's (`step_loss`): each step runs one forward over the AR sequences and
the sampled states together, the AR loss on the responses and the consistency loss of each state against the
target block's distribution (for the global loss with the teacher's response as AR labels, that target is read off
the AR forward itself: the fixed point is a prefix of the response). Jacobi Forcing's (`forcing_loss`): whole
responses packed with a noisy state per block under a noise-conditioned mask (cllm_core/training/forcing.py).
Logits are computed only where a loss reads them, and an optional anchor keeps the student near its start."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from cllm_core.runtime.config import FinetuneConfig, ModelConfig
from cllm_core.runtime.models import load_model
from cllm_core.training import forcing
from cllm_core.training.batches import Batch, PackedBatch
from cllm_core.training.losses import ar_loss, consistency_kl, consistency_mask


def step_loss(lm, batch: Batch, config: FinetuneConfig, reuse_ar: bool, head: torch.nn.Module | None = None,
              anchor: Anchor | None = None, share: tuple[float, float] = (1.0, 1.0),
              labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """The weighted loss of one batch and its terms (floats) for logging.

    `labelled`: the (rows, positions) of `batch.ar_mask`, found on the host before the batch moved to the device
    (`ar_index`); a boolean index on the device would make the host wait for it every step. Found here if absent.

    `share` (consistency, AR): each mean's factor from this process's positions to the whole step's across
    processes (`process_shares`), so that the processes' mean is the mean over every position of the step, and their
    averaged gradient the one process's of the same samples; (1, 1) alone.

    The AR sequences and the states go through the model in one forward; with `reuse_ar` (global loss and
    the teacher's response as AR labels) the fixed point's logits are read off the AR half, detached. With
    `head` (the model's output embedding, when `logits_head` vouches that it alone turns the last hidden state
    into logits), logits are computed only where a loss reads them: the AR labels and the state blocks, a few
    hundred of a step's thousands of positions, instead of a (rows, T, vocabulary) tensor. With `anchor`, the
    frozen starting model reads the AR sequences too, and its distributions at the AR labels are the anchor term's.
    """
    ar_ids, state_ids = batch.ar_ids, batch.state_ids
    width = max(ar_ids.shape[1], state_ids.shape[1])
    both = torch.cat([_widen(ar_ids, width), _widen(state_ids, width)])  # (B + S, T)
    logits_at = logits_reader(lm, both, head)  # (rows, index) -> logits there
    rows = torch.arange(len(both), device=both.device)[:, None]
    index = _block_positions(batch)  # (S, n)
    student = logits_at(rows[len(ar_ids):], index)  # (S, n, V)
    if reuse_ar and config.consistency == "global":  # one AR row per block serves its k states
        k = batch.states_per_block
        target = logits_at(rows[: len(ar_ids)], index[::k]).detach().repeat_interleave(k, 0)  # (S, n, V)
    else:
        with torch.no_grad():
            target = logits_reader(lm, batch.target_ids, head)(rows[: len(batch.target_ids)], index)
    mask = consistency_mask(batch.states, batch.fixed_points, batch.block_len)  # (S, n)
    consistency = consistency_kl(student, target, mask) * share[0]
    labelled = labelled if labelled is not None else ar_index(batch)  # (rows, positions) of the AR labels
    at_labels = logits_at(*labelled)
    ar = ar_loss(at_labels, batch.ar_targets[labelled], torch.ones_like(labelled[0], dtype=torch.bool),
                 config.label_smoothing) * share[1]
    loss = config.consistency_weight * consistency + config.ar_weight * ar
    agreement = _share_of(student.argmax(-1) == batch.fixed_points, mask)
    terms = {"consistency": consistency.detach(), "ar": ar.detach(), "agreement": agreement * share[0]}
    if anchor is not None:
        loss, terms = _anchored(loss, terms, at_labels, anchor(ar_ids)(*labelled), config, share[1])
    return loss, {"loss": loss.detach(), **terms}


def forcing_loss(lm, batch: PackedBatch, config: FinetuneConfig, head: torch.nn.Module | None = None,
                 anchor: Anchor | None = None, share: tuple[float, float] = (1.0, 1.0),
                 labelled: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Jacobi Forcing's weighted loss of one packed batch and its terms, from one forward
    (cllm_core/training/forcing.py).

    The AR loss reads the clean stream (the AR forward of prompt + response under the mask); the consistency loss
    is KL(clean ‖ noisy) at each counted noisy position against the detached logits of its clean twin (the same
    block offset, so the same position id); agreement: the noisy position's argmax equals the fixed point's next
    token (the label of its clean twin). With `anchor`, the frozen starting model reads the same packed batch, and
    its clean-stream distributions at the AR labels are the anchor term's. `share`, `labelled`: as in `step_loss`.
    """
    device = batch.ids.device.type  # the mask in the autocast dtype: fp32's minimum is -inf in fp16
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    inputs = {"attention_mask": forcing.attention_bias(batch.kind, compute, batch.segment),
              "position_ids": batch.positions}
    logits_at = logits_reader(lm, batch.ids, head, **inputs)
    labelled = labelled if labelled is not None else ar_index(batch)  # row-major: their flat indices are sorted
    at_labels = logits_at(*labelled)  # (P, V)
    row, noisy, clean = batch.pairs.unbind(1)  # (K,) each
    student = logits_at(row, noisy)[None]  # (1, K, V)
    width = batch.ids.shape[1]  # a clean twin is an AR label (it predicts the clean stream's next token): its
    twin = torch.searchsorted(labelled[0] * width + labelled[1], row * width + clean)  # logits are read once
    target = at_labels[twin].detach()[None]
    counted = torch.ones_like(row, dtype=torch.bool)[None]
    consistency = consistency_kl(student, target, counted) * share[0]
    ar = ar_loss(at_labels, batch.labels[labelled], torch.ones_like(labelled[0], dtype=torch.bool),
                 config.label_smoothing) * share[1]
    loss = config.consistency_weight * consistency + config.ar_weight * ar
    agreement = _share_of(student[0].argmax(-1) == batch.labels[row, clean], counted[0])
    terms = {"consistency": consistency.detach(), "ar": ar.detach(), "agreement": agreement * share[0]}
    if anchor is not None:
        loss, terms = _anchored(loss, terms, at_labels, anchor(batch.ids, **inputs)(*labelled), config, share[1])
    return loss, {"loss": loss.detach(), **terms}


def ar_index(batch: Batch | PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, positions) where the AR loss counts, row-major; on the device of the batch."""
    return batch.ar_mask.nonzero(as_tuple=True)


def _share_of(hits: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """The share of counted positions that are hits, 1 when none is counted; a device tensor (no host sync)."""
    total = counted.sum()
    return torch.where(total > 0, (hits & counted).sum() / total.clamp(min=1), 1.0)

Anchor = Callable[..., Callable[..., torch.Tensor]]  # (ids, **forward inputs) -> (rows, positions) -> logits


def frozen_anchor(model: ModelConfig, device: torch.device) -> Anchor:
    """The starting model, frozen on `device`, as `logits_reader` without gradients: what the anchor term keeps."""
    frozen = load_model(model.model_copy(update={"device": "cpu"})).eval().requires_grad_(False).to(device)
    head = logits_head(frozen)

    def logits_at(ids: torch.Tensor, **inputs) -> Callable[..., torch.Tensor]:
        with torch.no_grad():  # and its weights need no gradient, so the head applied later builds no graph either
            return logits_reader(frozen, ids, head, **inputs)
    return logits_at


def _anchored(loss: torch.Tensor, terms: dict, student: torch.Tensor, start: torch.Tensor, config: FinetuneConfig,
              share: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The loss plus the anchor term: KL(starting model ‖ student) at the AR labels (student, start: (P, V))."""
    anchor = consistency_kl(student[None], start[None], torch.ones(student.shape[:1], dtype=torch.bool,
                                                                   device=student.device)[None]) * share
    return loss + config.anchor_weight * anchor, terms | {"anchor": anchor.detach()}


def logits_head(lm) -> torch.nn.Module | None:
    """The output embedding, if applying it to the last hidden state gives the model's logits exactly (a plain
    LM head: Llama, Qwen, SmolLM2); None for a model that transforms logits after it (soft-capping, scaling)."""
    head = lm.get_output_embeddings()
    probe = torch.arange(4, device=lm.device)[None] % lm.config.vocab_size
    with torch.no_grad():
        out = lm(input_ids=probe, output_hidden_states=True)
        exact = head is not None and torch.equal(head(out.hidden_states[-1]), out.logits)
    return head if exact else None


def logits_reader(lm, ids: torch.Tensor, head: torch.nn.Module | None, **inputs):
    """A function (rows, positions) -> the logits there (index tensors of one shape, the result that shape + V):
    the last hidden states through `head` only there, or (no head) read off the full logits. `inputs`: more
    arguments of the forward (a 4-D attention mask, position ids)."""
    if head is None:
        logits = lm(input_ids=ids, **inputs).logits
        return lambda rows, positions: logits[rows, positions]
    hidden = lm(input_ids=ids, logits_to_keep=1, output_hidden_states=True, **inputs).hidden_states[-1]  # (R, T, H)
    return lambda rows, positions: head(hidden[rows, positions])


def process_shares(accelerator: Accelerator, batch: Batch | PackedBatch) -> tuple[float, float]:
    """(consistency, AR): N x this process's counted positions / the step's across its N processes. A loss's
    mean times its share, averaged over the processes (as DDP averages gradients), is the mean over the step's
    positions: the processes train as one process would on their samples together. One small all-reduce."""
    if accelerator.num_processes == 1:
        return 1.0, 1.0
    if isinstance(batch, PackedBatch):
        counts = [len(batch.pairs), int(batch.ar_mask.sum())]
    else:
        counts = [int(consistency_mask(batch.states, batch.fixed_points, batch.block_len).sum()),
                  int(batch.ar_mask.sum())]
    total = accelerator.reduce(torch.tensor(counts, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return tuple(accelerator.num_processes * count / whole if whole else 1.0 for count, whole in zip(counts, total))


def _block_positions(batch: Batch) -> torch.Tensor:
    """(B, n): the logit position predicting each block token (block_start - 1 + i), clamped into range."""
    n = batch.states.shape[1]
    positions = batch.block_start[:, None] - 1 + torch.arange(n, device=batch.block_start.device)
    return positions.clamp(max=batch.state_ids.shape[1] - 1)


def _widen(ids: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=0)
