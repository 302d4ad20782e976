"""Precision by hardware: one setting (auto, bf16, fp16, fp32) for every stage that trains or decodes.

`auto` takes bf16 only where the device computes it natively: a CUDA device that supports it, or a CPU whose
bf16 matmul is not slower than its fp32 one (AVX512-BF16 or AMX). On a CPU without them (AVX2 only) a bf16
matmul falls back to emulation and runs 20-36x slower than fp32, so a job tuned on the first kind of CPU
silently falls apart on the second. The CPU is judged by a short timed probe, because its flags are not
enough: `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA` (or a VM's CPU model) can take the fast kernels away
from a CPU that lists the flags. The choice is resolved once per process and device kind.

Training keeps fp32 master weights and autocasts to the resolved dtype (fp32: no autocast); decoding loads
the weights in it. fp32 keeps Jacobi output token-identical to greedy AR.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import Precision

PRECISIONS: tuple[str, ...] = get_args(Precision)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Resolved:
    """A precision setting as resolved on one device kind: the name, the torch dtype and why."""

    setting: str
    name: Literal["bf16", "fp16", "fp32"]
    device: str
    reason: str
    measured: bool = False  # chosen by a CLLM's own decoding measurement (`for_model`), not by `resolve`

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def autocast(self) -> torch.dtype | None:
        """The autocast dtype of training over fp32 weights (None: plain fp32)."""
        return None if self.name == "fp32" else self.dtype

    def describe(self) -> str:
        return f"precision {self.name} on {self.device} ({self.setting}: {self.reason})"


def resolve(setting: str = "auto", device: str | torch.device = "cpu") -> Resolved:
    """The precision `setting` means on `device`; `auto` by the hardware, explicit values as given."""
    kind = torch.device(device).type if str(device) != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if setting not in PRECISIONS:
        raise UserError(f"unknown precision {setting!r}; choose one of {', '.join(PRECISIONS)}")
    return _resolve(setting, kind)


@functools.cache
def _resolve(setting: str, kind: str) -> Resolved:
    if setting != "auto":
        return Resolved(setting, setting, kind, "set explicitly")
    if kind == "cuda":
        native = torch.cuda.is_bf16_supported()
        return Resolved(setting, "bf16" if native else "fp32", kind,
                        "the GPU supports bf16" if native else "this GPU has no bf16")
    if kind == "cpu":
        ratio = cpu_bf16_slowdown()
        native = ratio <= NATIVE_BF16_MAX_SLOWDOWN
        return Resolved(setting, "bf16" if native else "fp32", kind,
                        f"a bf16 matmul takes {ratio:.2g}x the fp32 time on this CPU: "
                        + ("native bf16" if native else "no native bf16"))
    return Resolved(setting, "fp32", kind, f"no bf16 probe for {kind}")


NATIVE_BF16_MAX_SLOWDOWN = 2.0
"""A CPU computes bf16 natively when its bf16 matmul takes at most this multiple of the fp32 time (measured here:
0.6-1.2x with AMX, 36-107x with AVX2 kernels only)."""


def device_name(device: str | torch.device) -> str:
    """The kind of machine a measurement holds for: the CPU's kernel class (AVX512, AVX2, ...) or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.backends.cpu.get_cpu_capability()})"


def for_model(setting: str, name_or_path: str, device: str | torch.device = "cpu") -> Resolved:
    """`resolve`, except that with `auto` a CLLM directory whose config holds a decoding choice measured on this
    kind of machine (`cllm_decoding`, cllm_core/evaluation/tuning.py) decodes in the precision measured fastest for
    it."""
    kind = torch.device(device).type if str(device) != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    choice = measured_choice(name_or_path)
    if setting == "auto" and choice and choice.get("device") == device_name(kind):
        return Resolved(setting, choice["precision"], kind, f"measured fastest for this CLLM on {choice['device']}: "
                        f"n_tokens {choice['n_tokens']}, {choice['speedup']:.2f}x the fastest AR", measured=True)
    return resolve(setting, device)


def measured_choice(name_or_path: str) -> dict | None:
    """The decoding choice a CLLM directory's config holds (`cllm_decoding`, cllm_core/evaluation/tuning.py), if any."""
    config = Path(name_or_path) / "config.json"
    return json.loads(config.read_text()).get("cllm_decoding") if config.is_file() else None


def cpu_bf16_slowdown(size: int = 192, repeats: int = 5) -> float:
    """Time of a bf16 matmul over the fp32 one on this CPU: the best of `repeats` each, interleaved after a
    warm-up, so a busy machine slows both alike (a few ms in all)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    pairs = {dtype: (a.to(dtype), b.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    for round_ in range(repeats + 1):
        for dtype, (x, y) in pairs.items():
            start = time.perf_counter()
            x @ y
            if round_:  # the first round is the warm-up
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)
