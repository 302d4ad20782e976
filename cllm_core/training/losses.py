"""The CLLM objectives as pure functions of logits, targets and masks (docs/design/cllm_reference.md, "Objectives").

Consistency: the student, fed an intermediate Jacobi state, should predict at every block position what the
model predicts there when fed the fixed point (global, GC) or the next state of the trajectory (local, LC).
Both are the forward KL(target ‖ student) with the target detached, averaged over the positions from the
state's first wrong token to the end of the block (earlier positions see the same context in both, so the
KL there is zero and would only dilute the mean). AR: cross-entropy on the teacher's response (or the ground
truth), with label smoothing. Weights are the caller's, from config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def consistency_kl(student_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean forward KL(softmax(target) ‖ softmax(student)) over the masked positions.

    student_logits, target_logits: (B, n, V), the logits that predict each block position; the target is
    detached here, so gradient reaches the student only. mask: (B, n) bool, True where the loss counts (from
    the first wrong token to the block's end, never padding or post-EOS positions). 0 when nothing counts.
    """
    student = F.log_softmax(student_logits[mask].float(), dim=-1)  # (P, V)
    target = F.log_softmax(target_logits[mask].detach().float(), dim=-1)
    # a sum over a count clamped at 1 (not `if not mask.any()`: a host read of the device every step)
    return F.kl_div(student, target, log_target=True, reduction="sum") / mask.sum().clamp(min=1)


def ar_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0
            ) -> torch.Tensor:
    """Mean next-token cross-entropy with label smoothing over the masked label positions.

    logits: (B, T, V) of a sequence; labels: (B, T), the tokens logits[:, t] predicts (the sequence shifted
    left by one); mask: (B, T) bool, True where a label counts (response tokens; never padding).
    """
    return F.cross_entropy(logits[mask].float(), labels[mask], label_smoothing=label_smoothing,
                           reduction="sum") / mask.sum().clamp(min=1)


def first_wrong(states: torch.Tensor, fixed_points: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Index of each state's first token that differs from its fixed point (the block length if none).

    states, fixed_points: (B, n) token ids; lengths: (B,) real block lengths (a block cut at EOS is shorter).
    """
    n = states.shape[1]
    valid = torch.arange(n, device=states.device) < lengths[:, None]  # (B, n)
    wrong = (states != fixed_points) & valid
    return torch.where(wrong.any(1), wrong.int().argmax(1), lengths)


def consistency_mask(states: torch.Tensor, fixed_points: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: the block positions from the state's first wrong token to the block's real end."""
    n = states.shape[1]
    position = torch.arange(n, device=states.device)[None, :]
    return (position >= first_wrong(states, fixed_points, lengths)[:, None]) & (position < lengths[:, None])
