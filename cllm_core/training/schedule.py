"""The learning-rate schedule both trainings use: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, progress: float, floor: float) -> float:
    """The factor on the peak learning rate at `step` (0-based): (step + 1) / warmup_steps while warming up, then
    from 1 down to `floor` along a half cosine as `progress` goes from 0 to 1 (clamped)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
