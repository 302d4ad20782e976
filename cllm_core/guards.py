"""No silent garbage: the checks that stop a run, or make it loud, when a stage's result cannot be trusted.

A wall-clock guard that ends training before its step budget leaves a model the config did not ask for:
that is one loud line (`budget_warning`) and the run goes on. A model below its quality floor, or a
collection whose responses are mostly degenerate repetition, stops the run in one line before anything
downstream starts (`BelowQualityFloor`, `TooRepetitive`, `NothingCollected`: UserErrors, so `cllm` prints them as
one line).
"""

from __future__ import annotations

from cllm_core.errors import UserError
from cllm_core.records import ShardManifest


class BelowQualityFloor(UserError):
    """A trained model scored below the floor its config sets: nothing downstream should use it."""


class TooRepetitive(UserError):
    """Most collected responses are degenerate repetition: fine-tuning on them can only learn noise."""


class NothingCollected(UserError):
    """A collection holds no trajectory (every prompt left out): there is nothing to fine-tune on."""


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


def check_collected(manifests: list[ShardManifest], finished_only: bool, max_new_tokens: int) -> None:
    """Raise `NothingCollected` when these shard manifests hold no row: a run must not go on to train on nothing."""
    if sum(m.rows for m in manifests):
        return
    seen = sum(m.rows + m.unfinished for m in manifests)
    why = (f": collect.finished_only left out all {seen} prompts, none of whose greedy responses ended within "
           f"max_new_tokens {max_new_tokens}; raise collect.jacobi.max_new_tokens or set collect.finished_only: false"
           if finished_only else "")
    raise NothingCollected(f"the collection holds no trajectory{why}")
