"""The CLLM objectives and the sample transforms, on hand-made tensors (no model)."""

import random

import pytest
import torch

from cllm_core.runtime.config import FinetuneConfig
from cllm_core.training.batches import augment_state
from cllm_core.training.losses import ar_loss, consistency_kl, consistency_mask, first_wrong
from cllm_core.training.setup import lr_factor


def logits(seed: int, shape=(2, 4, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_consistency_is_zero_when_student_and_target_agree():
    target = logits(0)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert consistency_kl(target.clone(), target, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert consistency_kl(logits(1), target, mask).item() > 0.01


def test_consistency_ignores_masked_positions():
    student, target = logits(0), logits(1)
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    changed = student.clone()
    changed[~mask] = 100 * logits(2)[~mask]
    assert consistency_kl(changed, target, mask).item() == pytest.approx(consistency_kl(student, target, mask).item())
    assert consistency_kl(student, target, torch.zeros_like(mask)).item() == 0.0


def test_consistency_is_the_mean_forward_kl_over_counted_positions():
    student, target = logits(0), logits(1)
    mask = torch.tensor([[True, True, False, False], [False, False, False, True]])
    p, log_p, log_q = target.softmax(-1), target.log_softmax(-1), student.log_softmax(-1)
    per_position = (p * (log_p - log_q)).sum(-1)  # KL(target ‖ student) at each position
    assert consistency_kl(student, target, mask).item() == pytest.approx(per_position[mask].mean().item(), rel=1e-5)


def test_gradient_reaches_the_student_only():
    student, target = logits(0).requires_grad_(), logits(1).requires_grad_()
    consistency_kl(student, target, torch.ones(2, 4, dtype=torch.bool)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert target.grad is None


def test_ar_loss_counts_only_masked_labels_and_smooths_as_configured():
    lg = logits(0, (1, 3, 5))
    labels = torch.tensor([[1, 4, 2]])
    mask = torch.tensor([[True, False, True]])
    log_p = lg.log_softmax(-1)[0]
    nll = -(log_p[0, 1] + log_p[2, 2]) / 2
    uniform = -(log_p[0].mean() + log_p[2].mean()) / 2
    assert ar_loss(lg, labels, mask).item() == pytest.approx(nll.item(), rel=1e-5)
    assert ar_loss(lg, labels, mask, 0.1).item() == pytest.approx((0.9 * nll + 0.1 * uniform).item(), rel=1e-5)
    confident = torch.full((1, 3, 5), -50.0).scatter(2, labels[..., None], 50.0)
    assert ar_loss(confident, labels, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_mask_runs_from_the_first_wrong_token_to_the_blocks_real_end():
    fixed = torch.tensor([[5, 6, 7, 8], [5, 6, 2, 0], [5, 6, 7, 8]])  # row 1: EOS (2) at 2, then padding
    states = torch.tensor([[5, 9, 7, 9], [9, 6, 9, 9], [5, 6, 7, 8]])
    lengths = torch.tensor([4, 3, 4])
    assert first_wrong(states, fixed, lengths).tolist() == [1, 0, 4]
    assert consistency_mask(states, fixed, lengths).tolist() == [
        [False, True, True, True],
        [True, True, True, False],  # past the EOS nothing counts, though the state differs there
        [False, False, False, False],  # a state equal to its fixed point teaches nothing
    ]


def test_augmentation_corrects_wrong_tokens_after_the_first_error_only():
    fixed = list(range(10, 26))
    state = [10, 11, 0, 13, 0, 0, 16, 0, 0, 0, 0, 21, 0, 0, 0, 0]
    wrong = [i for i, (s, f) in enumerate(zip(state, fixed)) if s != f]
    for seed in range(20):
        out = augment_state(state, fixed, random.Random(seed))
        changed = [i for i, (a, b) in enumerate(zip(state, out)) if a != b]
        assert out[2] == 0  # the first error stays: the state is still intermediate
        assert set(changed) <= set(wrong[1:]) and all(out[i] == fixed[i] for i in changed)
        assert 1 <= len(changed) <= len(wrong) // 2
    assert augment_state(state, fixed, random.Random(3)) == augment_state(state, fixed, random.Random(3))
    assert augment_state([1, 2], [1, 2], random.Random(0)) == [1, 2]


def test_schedule_warms_up_then_decays_to_the_floor():
    config = FinetuneConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(config, step) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
