"""Precision by hardware: one setting, resolved by what the device computes natively, used by every stage."""

import pytest
import torch

from cllm_core.runtime import precision
from cllm_core.runtime.config import Profile
from cllm_core.runtime.precision import resolve
from cllm_core.training.muon import Muon


@pytest.fixture(autouse=True)
def _fresh_resolution():
    precision._resolve.cache_clear()
    yield
    precision._resolve.cache_clear()


@pytest.mark.parametrize(("slowdown", "expected"), [(0.6, "bf16"), (1.9, "bf16"), (36.0, "fp32"), (88.0, "fp32")])
def test_auto_takes_bf16_on_a_cpu_only_where_its_bf16_matmul_is_native(monkeypatch, slowdown, expected):
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: slowdown)
    resolved = resolve("auto", "cpu")
    assert resolved.name == expected and f"{slowdown:.2g}x" in resolved.describe()
    assert resolved.autocast == (torch.bfloat16 if expected == "bf16" else None)


@pytest.mark.parametrize(("supported", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_takes_bf16_on_a_cuda_device_that_supports_it(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert resolve("auto", "cuda:1").name == expected


def test_explicit_precisions_are_taken_as_given_without_a_probe(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: pytest.fail("probed"))
    assert [resolve(name, "cpu").dtype for name in ("bf16", "fp16", "fp32")] == [
        torch.bfloat16, torch.float16, torch.float32]
    assert resolve("fp32", "cpu").autocast is None


def test_the_resolution_is_made_once_per_process_and_device_kind(monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: calls.append(1) or 50.0)
    assert {resolve("auto", device).name for device in ("cpu", "cpu", "cpu:0")} == {"fp32"} and len(calls) == 1


def test_the_probe_tells_this_cpu_apart():
    """Not mocked: whatever this CPU is, the probe's figure lands on one side of the threshold, far from it."""
    ratio = precision.cpu_bf16_slowdown()
    assert ratio <= precision.NATIVE_BF16_MAX_SLOWDOWN or ratio > 4 * precision.NATIVE_BF16_MAX_SLOWDOWN


@pytest.mark.parametrize(("section", "field"), [("model", "dtype"), ("finetune", "mixed_precision")])
def test_an_old_per_stage_dtype_points_at_the_one_precision_setting(section, field):
    data = {"model": {"name_or_path": "x"}, section: ({"name_or_path": "x"} if section == "model" else {}) | {
        field: "bf16"}}
    with pytest.raises(ValueError, match="set the profile's top-level `precision`"):
        Profile.model_validate(data)
    assert Profile.model_validate({"precision": "fp16"}).precision == "fp16"


def test_muon_in_bf16_is_torchs_muon_and_in_fp32_never_touches_bf16(monkeypatch):
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(48, 24)), None
    theirs = torch.nn.Parameter(ours.detach().clone())
    mine = Muon([ours], lr=0.02, weight_decay=0.1, dtype=torch.bfloat16)
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(48, 24)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    assert torch.equal(ours, theirs)

    seen = []
    real = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: seen.append(a) or real(self, *a, **k))
    fp32 = torch.nn.Parameter(torch.randn(8, 4))
    fp32.grad = torch.randn(8, 4)
    Muon([fp32], dtype=torch.float32).step()
    assert torch.bfloat16 not in [x for args in seen for x in args]
