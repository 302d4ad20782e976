"""The evaluation, promotion and tracking sections, and the profile that holds every section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, model_validator

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config.finetune import FinetuneConfig
from cllm_core.runtime.config.sections import (
    CollectConfig,
    IngestConfig,
    JacobiConfig,
    ModelConfig,
    Precision,
    Section,
    SftConfig,
    TeacherConfig,
    refuse_moved_jacobi,
)


class MultiBlockConfig(Section):
    """Jacobi Forcing's multi-block decoding and rejection recycling (`jacobi_steps`: blocks, open_at, pool)."""

    blocks: int = Field(2, ge=1, description="Blocks the guess may span (Jacobi Forcing's K).")
    open_at: float = Field(0.85, gt=0, le=1, description="Share of the last open block solved before the next "
                           "opens (its r).")
    pool: int = Field(4, ge=1, description="jacobi_recycling: rejected drafts kept; each that holds the newly "
                      "committed token proposes a branch of the next pass.")


class PromoteConfig(Section):
    """When the pipeline's CLLM earns the registry alias users load (`models:/cllm@champion`): its evaluation must
    pass every floor set here (null: that floor is not checked). A CLLM that fails stays a registered candidate
    without the alias, and the run ends in one line naming the floor."""

    alias: str = Field("champion", min_length=1, description="The registered-model alias a passing CLLM gets.")
    min_answer_agreement: float | None = Field(0.8, ge=0, le=1, description="The CLLM's Jacobi final answers equal "
                                               "to the teacher's AR answers on at least this share of prompts.")
    max_accuracy_drop: float | None = Field(0.05, ge=0, le=1, description="The CLLM's Jacobi accuracy at most this "
                                            "far below the teacher's AR accuracy (0.05: 5 points).")
    min_speedup: float | None = Field(1.0, gt=0, description="The CLLM's Jacobi at least this many times the "
                                      "teacher's AR tokens/s.")


class EvalConfig(Section):
    """Speed and quality evaluation: which methods, how they decode, how answers are judged."""

    methods: list[Literal["ar", "generate", "jacobi", "lookup", "jacobi_lookup", "jacobi_multiblock",
                          "jacobi_recycling"]] = Field(
        ["ar", "jacobi", "lookup"], min_length=1, description="Decoders to compare: greedy AR through the Jacobi "
        "loop's own forward, one token a pass (ar: the baseline of every speedup, the fastest AR here), "
        "transformers' greedy `generate` (generate: the same output with its own per-step costs), "
        "Jacobi, prompt-lookup decoding, Jacobi with prompt lookup's drafts (jacobi_lookup: each new block's "
        "guess drafted from the context, and every pass verifying the draft after the last token as a second "
        "branch beside Jacobi's update), Jacobi Forcing's multi-block decoding (jacobi_multiblock) and the same "
        "with rejection recycling (jacobi_recycling); all but lookup are exact like Jacobi.")
    multiblock: MultiBlockConfig = Field(MultiBlockConfig(), description="jacobi_multiblock and "
                                         "jacobi_recycling's settings.")
    jacobi: JacobiConfig = Field(JacobiConfig(), description="How Jacobi decodes (max_new_tokens: the budget of "
                                 "every method). In a profile the block size defaults to the one the CLLM was "
                                 "trained for, the budget to collection's.")
    lookup_tokens: int = Field(10, ge=1, description="Prompt lookup: tokens proposed per step.")
    batch_size: int = Field(1, ge=1, description="Prompts decoded together (1: the paper's latency setting).")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N eval prompts.")
    warmup: int = Field(2, ge=0, description="Untimed warm-up decodes per model and method.")
    check: Literal["auto", "math", "exact"] = Field(
        "auto", description="How an answer is judged: the number after `####` (math), the whole text (exact), "
        "or auto: the ingest preset's check (math for gsm8k and synthetic-math, exact otherwise).")
    promote: PromoteConfig = Field(PromoteConfig(), description="The floors a pipeline's CLLM must pass to get "
                                   "the registry alias users load.")

    @model_validator(mode="before")
    @classmethod
    def _flat_jacobi(cls, data):
        refuse_moved_jacobi(data, "evaluate")
        return data


class TrackingConfig(Section):
    """Where runs are recorded in MLflow."""

    uri: str | None = Field(None, description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else "
                            "sqlite:///<work_dir>/mlflow.db.")
    experiment: str = Field("cllm", description="MLflow experiment the runs go to.")

    @model_validator(mode="after")
    def _no_credentials(self) -> TrackingConfig:
        if self.uri and urlsplit(self.uri).username is not None:  # profiles are logged and stored as parameters
            raise UserError("uri carries credentials; keep them out of profiles: set MLFLOW_TRACKING_URI in the "
                            "environment, or for a server MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                            "(or MLFLOW_TRACKING_TOKEN)")
        return self


class SecondRound(Section):
    """Jacobi Forcing's second round: trajectories collected from the round-1 CLLM (often at a larger block size)
    and that CLLM fine-tuned again on them, into <work_dir>/cllm-round2, evaluated beside the teacher and round 1.
    In a profile each section says only what differs from round 1's."""

    collect: CollectConfig = Field(CollectConfig(), description="Collection from the round-1 CLLM.")
    finetune: FinetuneConfig = Field(FinetuneConfig(), description="Fine-tuning of the round-1 CLLM.")
    teacher_fixed_points: bool = Field(True, description="Keep only the round-1 CLLM's trajectories whose fixed "
                                       "points are the teacher's greedy response (round 1's store holds it: "
                                       "`collect.reference`). A trajectory that departs from it would train the "
                                       "CLLM's own departures into round 2 as targets: on the demo, 44 of 8,000 "
                                       "took round 2 from 99.05% of held-out outputs identical to the teacher's to "
                                       "98.6%, and leaving them out kept 99.05%. false: keep every trajectory (the "
                                       "reference implementation's round 2). A `collect.reference` the profile sets "
                                       "(round 2 inherits round 1's) is used instead.")

    def collection(self, teacher_store: str) -> CollectConfig:
        """Round 2's collection: `collect`, checked against `teacher_store` (round 1's: the teacher's greedy
        responses) when `teacher_fixed_points` asks and the profile names no reference of its own."""
        if self.teacher_fixed_points and self.collect.reference is None:
            return self.collect.model_copy(update={"reference": teacher_store})
        return self.collect


def _over(base: dict, part: dict) -> dict:
    """`part` over `base`, nested sections merged key by key."""
    return base | {key: _over(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict)
                   else value for key, value in part.items()}


class Profile(Section):
    """A YAML profile in configs/: only what differs from the defaults."""

    work_dir: Path = Field(Path("runs/demo"), description="Where stages write prompts, models, runs and reports.")
    precision: Precision = Field("auto", description="Precision of every stage that trains or decodes: auto (bf16 "
                                 "where the device computes it natively: a CUDA GPU that supports it, a CPU with "
                                 "AVX512-BF16 or AMX; fp32 otherwise), bf16, fp16 or fp32. Training keeps fp32 "
                                 "weights and autocasts; decoding loads the weights in it. fp32 keeps Jacobi output "
                                 "token-identical to greedy AR.")
    model: ModelConfig | None = Field(None, description="The teacher to load. Default with `teacher` or `sft`: the "
                                      "teacher they make in <work_dir>/teacher.")
    decode: JacobiConfig = Field(JacobiConfig(max_new_tokens=128), description="`cllm decode`'s Jacobi settings.")
    teacher: TeacherConfig | None = Field(None, description="Train this demo teacher from scratch (cached).")
    sft: SftConfig | None = Field(None, description="Make the teacher a domain teacher first: `sft.model` "
                                  "fine-tuned on the prompt source's answers (cached).")
    ingest: IngestConfig | None = Field(None, description="The prompt source.")
    collect: CollectConfig = Field(CollectConfig(), description="Trajectory collection.")
    finetune: FinetuneConfig = Field(FinetuneConfig(), description="Consistency fine-tuning.")
    evaluate: EvalConfig = Field(EvalConfig(), description="Speed and quality evaluation.")
    second_round: SecondRound | None = Field(None, description="Collect from the CLLM and fine-tune it again "
                                             "(Jacobi Forcing's second round); sections: what differs from round 1.")
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow tracking.")

    @model_validator(mode="before")
    @classmethod
    def _second_round_over_the_first(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("second_round"), dict):
            return data
        second = dict(data["second_round"])
        for section in ("collect", "finetune"):
            first, changed = (s.model_dump(exclude_unset=True) if isinstance(s, BaseModel) else dict(s or {})
                              for s in (data.get(section), second.get(section)))
            second[section] = _over(first, changed)
        return data | {"second_round": second}

    @model_validator(mode="before")
    @classmethod
    def _evaluate_as_collected(cls, data):
        """Evaluation's budget defaults to collection's: the responses the CLLM learned."""
        if not isinstance(data, dict):
            return data
        collect, evaluate = data.get("collect"), data.get("evaluate") or {}
        collect = collect.model_dump() if isinstance(collect, BaseModel) else collect or {}
        budget = (collect.get("jacobi") or {}).get("max_new_tokens")
        if budget is not None and isinstance(evaluate, dict) and "max_new_tokens" not in evaluate.get("jacobi", {}):
            data = data | {"evaluate": evaluate | {"jacobi": evaluate.get("jacobi", {}) | {"max_new_tokens": budget}}}
        return data

    @model_validator(mode="after")
    def _stages_agree(self) -> Profile:
        """Evaluation decodes within the budget the CLLM learned: blocks past collection's budget were never in its
        training data, and their speed would be counted as the CLLM's."""
        trained, asked = self.collect.jacobi.max_new_tokens, self.evaluate.jacobi.max_new_tokens
        if self.second_round is not None:
            trained = min(trained, self.second_round.collect.jacobi.max_new_tokens)
            blocks = (self.collect.jacobi.n_tokens, self.second_round.collect.jacobi.n_tokens)
            if self.evaluate.jacobi.n_tokens is None and blocks[0] != blocks[1]:
                raise UserError(f"second_round collects at n_tokens {blocks[1]}, round 1 at {blocks[0]}: both CLLMs "
                                "are evaluated at one block size; set evaluate.jacobi.n_tokens")
        if asked > trained:
            raise UserError(f"evaluate.jacobi.max_new_tokens ({asked}) is over collect.jacobi.max_new_tokens "
                            f"({trained}): the CLLM learns responses up to collection's budget; evaluate within it "
                            "or collect longer responses")
        return self

    @model_validator(mode="before")
    @classmethod
    def _teacher_is_the_model(cls, data):
        """With `teacher` or `sft` the model is the teacher they make in <work_dir>/teacher (on `sft.model`'s
        device); a `model` given in part (`--set model.device=cuda`) lays over it."""
        if not isinstance(data, dict) or (data.get("teacher") is None and data.get("sft") is None):
            return data
        if data.get("teacher") is not None and data.get("sft") is not None:
            raise UserError("the profile has both `teacher` (a demo teacher trained from scratch) and `sft` (a "
                            "pretrained model fine-tuned into the teacher): keep one")
        sft = data.get("sft")
        if sft is not None and not isinstance(sft, SftConfig) and not (isinstance(sft, dict) and "model" in sft):
            return data  # pydantic names what `sft` lacks
        work_dir = Path(data.get("work_dir") or cls.model_fields["work_dir"].default)
        made = str(work_dir / "teacher")
        base = sft.model if isinstance(sft, SftConfig) else ModelConfig.model_validate(sft["model"]) if sft else None
        model = base.derived(made).model_dump(exclude_defaults=True) if base else {"name_or_path": made}
        given = data.get("model")
        given = given.model_dump(exclude_defaults=True) if isinstance(given, ModelConfig) else dict(given or {})
        path = given.get("name_or_path", made)
        if sft is not None and path != made:
            raise UserError(f"with `sft` the profile's model is the teacher it makes, {made}, not {path}: name the "
                            "pretrained model to fine-tune as sft.model, and drop `model` (after a work_dir change "
                            "too; a part such as --set model.device=cuda still applies)")
        return data | {"model": model | given}

    @model_validator(mode="after")
    def _sft_has_a_source(self) -> Profile:
        if self.sft is not None and self.ingest is None:
            raise UserError("sft fine-tunes sft.model on the prompt source's answers: the profile needs an `ingest` "
                            "section naming the source")
        return self
