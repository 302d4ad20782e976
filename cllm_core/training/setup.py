"""A fine-tuning run set up: the reuse check (a finished CLLM of the same config, precision, teacher and data),
the data and labels, the accelerator, the model (LoRA when asked), optimizer and schedule, and the checkpoint it
resumes from."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from transformers import PreTrainedTokenizerBase

from cllm_core.data.samples import TrajectoryData, epoch_size, label_ids, load_trajectories
from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import FinetuneConfig, ModelConfig
from cllm_core.runtime.models import load_model, load_tokenizer, model_identity, resolve_device, tokenizer_fingerprint
from cllm_core.runtime.precision import resolve
from cllm_core.runtime.records import CllmRecord
from cllm_core.training.checkpoints import Checkpoints
from cllm_core.training.launch import MIXED_PRECISION
from cllm_core.training.objectives import Anchor, frozen_anchor, logits_head
from cllm_core.training.schedule import warmup_cosine
from cllm_core.training.shipping import ship_generate


@dataclass
class Training:
    """What `prepare` sets up and `fit` trains: the data, the model under accelerate, where it resumes."""

    config: FinetuneConfig
    model: ModelConfig
    store: str
    out_dir: Path
    precision: str
    fingerprint: str
    tokenizer: PreTrainedTokenizerBase
    data: TrajectoryData
    labels: dict[int, list[int]] | None
    checkpoints: Checkpoints
    accelerator: Accelerator
    lm: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    head: torch.nn.Module | None = None  # the LM head, to compute logits only where losses read them
    anchor: Anchor | None = None  # the frozen starting model's logits, when finetune.anchor_weight asks for them
    history: list = field(default_factory=list)
    start_step: int = 0
    spent: float = 0.0


def prepare(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, answers: dict[str, str] | None,
            precision: str, log: Callable[[str], None]) -> Training | CllmRecord:
    """The reuse check (the finished CLLM's record when it is the same run), then data, labels, the accelerator,
    the model and optimizer, and the checkpoint to resume from (checked against this config before any step)."""
    finished, (resolved, tokenizer, data, fingerprint) = _reuse_check(config, model, store, out_dir, precision, log)
    if finished is not None:
        return finished
    check_writable(out_dir)
    config = config.with_steps_for(epoch_size(data, config.objective))
    labels = None
    if config.ar_labels == "ground_truth":
        labels = label_ids(data, answers or {}, lambda text: tokenizer(text, add_special_tokens=False).input_ids,
                           tokenizer.eos_token_id)
    checkpoints = Checkpoints(out_dir.parent / f"{out_dir.name}.checkpoints", fingerprint)
    resume = checkpoints.latest()

    accelerator = make_accelerator(MIXED_PRECISION[resolved.name], device=resolve_device(model.device))
    sharded = accelerator.distributed_type == DistributedType.FSDP  # its head is only whole inside its forward
    if config.launch.processes > 1 and accelerator.num_processes != config.launch.processes:
        raise UserError(f"finetune.launch.processes is {config.launch.processes} but {accelerator.num_processes} "
                        "process(es) started: train through finetune() (it launches them), not by hand")
    if (config.launch.strategy == "fsdp") != sharded:
        raise UserError(f"finetune.launch.strategy is {config.launch.strategy} but accelerate runs "
                        f"{accelerator.distributed_type.value}: train through finetune() (it launches the "
                        "processes), not by hand")
    torch.manual_seed(config.seed)
    lm = load_model(model.model_copy(update={"device": "cpu"})).train()  # fp32 weights; autocast computes
    if config.gradient_checkpointing and not sharded:  # under FSDP, its own activation checkpointing
        lm.gradient_checkpointing_enable()
    if config.lora is not None:
        lm = with_lora(lm, config)
    head = None if sharded else logits_head(lm)
    trained = [p for p in lm.parameters() if p.requires_grad]  # every weight, or the adapters alone
    optimizer = torch.optim.AdamW(trained, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
    lm, optimizer = accelerator.prepare(lm, optimizer)  # not the scheduler: accelerate would step it once per
    # process each step (it assumes each process sees 1/N of the batches), decaying N times too fast here
    anchor = frozen_anchor(model, accelerator.device) if config.anchor_weight > 0 else None
    run = Training(config, model, store, out_dir, resolved.name, fingerprint, tokenizer, data, labels, checkpoints,
                   accelerator, lm, optimizer, scheduler, head, anchor)
    if resume is not None:
        state = checkpoints.load(resume, accelerator.unwrap_model(lm), optimizer, scheduler, accelerator.scaler,
                                 accelerator.process_index)
        run.history, run.start_step, run.spent = state["history"], state["step"], state["seconds"]
        log(f"resuming from {resume} at step {run.start_step}")
    batch = (f"batch {config.batch_size} responses packed as Jacobi Forcing (noise window {config.noise_window})"
             if config.objective == "jacobi_forcing" else f"batch {config.batch_size}")
    steps = f"{config.steps} steps" + (f" ({config.epochs:g} epochs)" if config.epochs else "")
    log(f"fine-tuning on {len(data.items):,} blocks of {len(data.rows):,} prompts (n_tokens {data.n_tokens}; "
        f"{data.excluded_repetitive} repetitive excluded) for {steps}, {batch}, {resolved.name}")
    return run


def finished_cllm(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, precision: str,
                  log: Callable[[str], None]) -> CllmRecord | None:
    """The CLLM in `out_dir` when it was trained with this config, precision, teacher and trajectories."""
    return _reuse_check(config, model, store, out_dir, precision, log)[0]


def _reuse_check(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, precision: str,
                 log: Callable[[str], None]) -> tuple[CllmRecord | None, tuple]:
    """The reusable record, if any, and what identifies this run: (precision, tokenizer, data, fingerprint)."""
    resolved = resolve(precision, model.device)
    tokenizer = load_tokenizer(model)
    teacher = model_identity(model)
    data = load_trajectories(store, config.include_repetitive, len(tokenizer), tokenizer_fingerprint(tokenizer),
                             teacher)
    fingerprint = f"{_as_started(config).fingerprint()}-{resolved.name}-{data.fingerprint}-{teacher}"
    identity = (resolved, tokenizer, data, fingerprint)
    record_path = out_dir / "cllm.json"
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if recorded.get("fingerprint") == fingerprint and recorded["metrics"]["stopped_early"]:
        log(f"the CLLM in {out_dir} was stopped by its guard at step {recorded['metrics']['train_steps']}; "
            "training again")
    elif recorded.get("fingerprint") == fingerprint:
        log(f"reusing the CLLM in {out_dir} (same config, precision, teacher and trajectories)")
        ship_generate(out_dir)  # the decoding it ships follows the engine installed now
        return CllmRecord.from_json(recorded, path=str(out_dir), reused=True), identity
    return None, identity


def _as_started(config: FinetuneConfig) -> FinetuneConfig:
    """The config as this process trains it: processes started by hand (torchrun: WORLD_SIZE) count as
    `launch.processes`, since `batch_size` is per process; a checkpoint or CLLM of another count is not this run."""
    started = int(os.environ.get("WORLD_SIZE") or 1)
    if config.launch.processes == 1 and started > 1:
        return config.model_copy(update={"launch": config.launch.model_copy(update={"processes": started})})
    return config


def with_lora(lm, config: FinetuneConfig):
    """`lm` with LoRA adapters (peft) on `config.lora`'s modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    if config.gradient_checkpointing:
        lm.enable_input_require_grads()  # recomputed blocks need an input that requires grad, frozen embeddings too
    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules  # peft's spelling
    return get_peft_model(lm, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=targets, task_type="CAUSAL_LM"))


def base_model(lm):
    """The transformers model inside a peft wrapper (adapters active), or `lm` itself: what the engine decodes."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def lr_factor(config: FinetuneConfig, step: int) -> float:
    """Linear warm-up, then cosine decay (over the steps after the warm-up) to `min_lr_ratio` at `steps`."""
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return warmup_cosine(step, config.warmup_steps, progress, floor=config.min_lr_ratio)


def make_accelerator(mixed_precision: str, device: torch.device) -> Accelerator:
    """This run's Accelerator on `device` (the model's). accelerate keeps one process-wide state and refuses a
    second precision in the same process (a notebook, a test session, a flow run that trains twice); the precision
    belongs to this run, so the cached precision is dropped while the process group (PartialState) is kept.
    A single process trains on accelerate's current CUDA device, so `cuda:N` is made current first (launched
    processes take theirs from their rank)."""
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device.index)
    patience = InitProcessGroupKwargs(timeout=timedelta(hours=2))  # the main process saving a 7B checkpoint
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu", kwargs_handlers=[patience])
    if accelerator.num_processes == 1 and accelerator.device.type == device.type and device.index is not None \
            and accelerator.device.index not in (None, device.index):
        raise UserError(f"model.device is {device} but accelerate chose {accelerator.device} "
                        "(CUDA_VISIBLE_DEVICES or an earlier run in this process set it); name the device it sees")
    return accelerator


def check_writable(out_dir: Path) -> None:
    """Fail before any step when the model directory cannot be written (probing it as the writer will)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = out_dir.parent / f".{out_dir.name}.write-test-{os.getpid()}"  # one per process under DDP
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"the model directory {out_dir} is not writable ({error.strerror or error})") from None
