"""No silent garbage: the checks that stop a run, or make it loud, when a stage's result cannot be trusted.

A wall-clock guard that ends training before its step budget leaves a model the config did not ask for:
that is one loud line (`budget_warning`) and the run goes on. A model below its quality floor, or a
collection whose responses are mostly degenerate repetition, stops the run in one line before anything
downstream starts (`BelowQualityFloor`, `TooRepetitive`: ValueErrors, so `cllm` prints them as one line).
"""

from __future__ import annotations

from cllm_core.records import ShardManifest


class BelowQualityFloor(ValueError):
    """A trained model scored below the floor its config sets: nothing downstream should use it."""


class TooRepetitive(ValueError):
    """Most collected responses are degenerate repetition: fine-tuning on them can only learn noise."""


def budget_warning(stage: str, done: int, steps: int, seconds: float, precision: str, knob: str) -> str:
    """The one loud line of a stage whose wall-clock guard stopped it before its step budget."""
    per_step = seconds / max(done, 1)
    return (f"STOPPED EARLY: the {stage}'s wall-clock guard ended training at step {done} of {steps} "
            f"({per_step:.2f} s per step in {precision}; all {steps} steps need about {per_step * steps / 60:.0f} "
            f"minutes): this is not the model the config asks for. Raise {knob}, or run where a step is faster "
            "(precision auto takes bf16 only where the CPU or GPU computes it natively)")


def check_repetition(manifests: list[ShardManifest], max_share: float) -> None:
    """Raise `TooRepetitive` when more than `max_share` of the responses in these shard manifests are repetitive."""
    repetitive, rows = sum(m.repetitive for m in manifests), sum(m.rows for m in manifests)
    if rows and repetitive / rows > max_share:
        raise TooRepetitive(
            f"{repetitive} of {rows} collected responses ({repetitive / rows:.0%}) are degenerate repetition, above "
            f"collect.max_repetitive {max_share:.0%}: the teacher does not answer (check its accuracy and "
            "precision, or the prompts' template); nothing was fine-tuned")
