"""No silent garbage: the checks that stop a run, or make it loud, when a stage's result cannot be trusted.

A wall-clock guard that ends training before its step budget leaves a model the config did not ask for:
that is one loud line (`budget_warning`) and the run goes on. A model below its quality floor, or a
collection whose responses are mostly degenerate repetition, stops the run in one line before anything
downstream starts (`BelowQualityFloor`, `TooRepetitive`, `NothingCollected`: UserErrors, so `cllm` prints them as
one line).
"""

from __future__ import annotations

import math

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import PromoteConfig
from cllm_core.runtime.records import ShardManifest, SummaryRow


class BelowQualityFloor(UserError):
    """A trained model scored below the floor its config sets: nothing downstream should use it."""


class TooRepetitive(UserError):
    """Most collected responses are degenerate repetition: fine-tuning on them can only learn noise."""


class NothingCollected(UserError):
    """A collection holds no trajectory (every prompt left out): there is nothing to fine-tune on."""


class Diverged(UserError):
    """Fine-tuning drove the AR loss far above where it started: the CLLM is forgetting the teacher's outputs."""


def check_divergence(history: list[dict], max_rise: float | None, lora: bool) -> None:
    """Raise `Diverged` when the latest log interval's AR loss is not finite or is more than `max_rise` nats above
    the run's first interval's (`history`: the loop's logged intervals, first to latest)."""
    if max_rise is None or not history:
        return
    first, latest = history[0]["ar"], history[-1]
    if math.isfinite(latest["loss"]) and latest["ar"] - first <= max_rise:
        return
    remedy = ("lower finetune.lr, or the adapters' rank or alpha (finetune.lora)" if lora
              else "lower finetune.lr")
    raise Diverged(f"fine-tuning diverged at step {latest['step']}: AR loss {latest['ar']:.3f} against {first:.3f} "
                   f"at the start (finetune.max_ar_rise {max_rise:g} nats), so the CLLM is forgetting the teacher's "
                   f"outputs; {remedy} (nothing was published)")


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
    unfinished, departed = sum(m.unfinished for m in manifests), sum(m.departed for m in manifests)
    seen = unfinished + departed
    why = ""
    if departed:
        why = (f": of {seen} prompts, {departed} departed from collect.reference's responses"
               + (f" and {unfinished} did not end within max_new_tokens {max_new_tokens}" if unfinished else "")
               + "; check the model collected from against the reference's (in a second round, the CLLM against "
               "the teacher), or collect without the reference (second_round.teacher_fixed_points: false)")
    elif finished_only:
        why = (f": collect.finished_only left out all {seen} prompts, none of whose greedy responses ended within "
               f"max_new_tokens {max_new_tokens}; raise collect.jacobi.max_new_tokens or set collect.finished_only: "
               "false")
    raise NothingCollected(f"the collection holds no trajectory{why}")


EXACT_METHODS = ("jacobi", "jacobi_lookup", "jacobi_multiblock", "jacobi_recycling")
"""The CLLM's decoders whose quality the floors read, the first evaluated in this order."""


def quality_failures(summary: list[SummaryRow], cllm: str, floors: PromoteConfig) -> list[str]:
    """The floors of `floors` that model `cllm`'s evaluation misses, each as a phrase ([] when it passes all).
    The summary's first row is the baseline (the teacher's AR): agreement and speedup are against it."""
    baseline = summary[0]
    row = next((r for method in EXACT_METHODS for r in summary if r.model == cllm and r.method == method), None)
    if row is None:
        return [f"the evaluation decoded no {cllm} with Jacobi ({', '.join(EXACT_METHODS)})"]
    name, failures = f"{cllm} {row.method}", []
    if floors.min_answer_agreement is not None and (row.answer_agreement or 0.0) < floors.min_answer_agreement:
        failures.append(f"{name} answers agree with {baseline.model}'s on {row.answer_agreement or 0.0:.1%} of "
                        f"prompts, below evaluate.promote.min_answer_agreement {floors.min_answer_agreement:.0%}")
    drop = baseline.accuracy - row.accuracy
    if floors.max_accuracy_drop is not None and drop > floors.max_accuracy_drop:
        failures.append(f"{name} accuracy {row.accuracy:.1%} is {drop:.1%} below {baseline.model}'s "
                        f"{baseline.accuracy:.1%}, more than evaluate.promote.max_accuracy_drop "
                        f"{floors.max_accuracy_drop:.0%}")
    if floors.min_speedup is not None and (row.speedup or 0.0) < floors.min_speedup:
        failures.append(f"{name} runs at {row.speedup or 0.0:.2f}x {baseline.model} {baseline.method}, below "
                        f"evaluate.promote.min_speedup {floors.min_speedup:g}x")
    return failures
