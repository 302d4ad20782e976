"""The fine-tuning section: objective, schedule, precision of the step, LoRA, and its launch across processes.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config.sections import Section, refuse_moved
from cllm_core.runtime.identity import digest


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
    `accelerate launch` over them from the same call and waits (cllm_core/training/launch.py)."""

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
    """Consistency fine-tuning: losses, samples, schedule, checkpoints (docs/design/cllm_reference.md, "Objectives")."""

    objective: Literal["cllm", "jacobi_forcing"] = Field(
        "cllm", description="cllm: the paper's loss on sampled blocks (states against their fixed point in a clean "
        "context). jacobi_forcing: whole responses packed as noisy state + fixed point per block under a "
        "noise-conditioned attention mask (arXiv 2512.14681; cllm_core/training/forcing.py); batch_size counts "
        "responses.")
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
    max_ar_rise: float | None = Field(1.0, gt=0, description="Divergence guard: stop, in one line, once a log "
                                      "interval's AR loss is this many nats above the run's first (a learning rate "
                                      "too high for the model, LoRA at a high rank typically, makes the CLLM forget "
                                      "the teacher's outputs; healthy runs rose under 0.1); none: no guard.")
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
        refuse_moved(data, "mixed_precision", "finetune.mixed_precision")
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
                    "registered_model", "decoding_sizes", "compile",
                    "max_ar_rise"} \
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
