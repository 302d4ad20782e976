"""Stage 3: consistency fine-tuning, teacher + trajectories -> a CLLM in an ordinary HF model directory.

A plain loop over `accelerate`: in this process (CPU, one GPU), or, with `finetune.launch` asking for more
processes or FSDP, in processes that `finetune` starts with `accelerate launch` and waits for (cllm_core/launch.py);
the same loop either way, and a process started by hand (torchrun) runs it too. Two
objectives: Jacobi Forcing (`objective: jacobi_forcing`, `forcing_loss`: whole responses packed with a noisy
state per block under a noise-conditioned mask, cllm_core/forcing.py) and the paper's (`step_loss`). Each
paper step runs one forward over the AR sequences and the sampled states together: the AR loss on the responses,
and the consistency loss of each state against the target block's distribution (for the global loss with the
teacher's response as AR labels, that target is read off the AR forward itself: the fixed point is a prefix
of the response). Checkpoints (weights as safetensors, the rest read back with `weights_only=True`) let a
killed run resume at the same step with the same batches; the model directory appears only when training
finished. The same config, teacher and data reuse the finished directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object
from transformers import GenerationConfig, PreTrainedTokenizerBase

from cllm_core import forcing
from cllm_core.checkpoints import Checkpoints, full_states, rng_state
from cllm_core.collect import read_prompt_table
from cllm_core.config import FinetuneConfig, ModelConfig
from cllm_core.errors import UserError
from cllm_core.files import exclusive, publish_dir, wait_unheld
from cllm_core.guards import budget_warning
from cllm_core.identity import model_identity
from cllm_core.jacobi import jacobi_generate
from cllm_core.launch import MIXED_PRECISION, launch_finetune, launched
from cllm_core.losses import ar_loss, consistency_kl, consistency_mask
from cllm_core.models import load_model, load_tokenizer, resolve_device, tokenizer_fingerprint
from cllm_core.precision import resolve
from cllm_core.prompts import encode
from cllm_core.records import CllmRecord
from cllm_core.samples import Batch, PackedBatch, Sampler, TrajectoryData, epoch_size, label_ids, load_trajectories
from cllm_core.schedule import warmup_cosine
from cllm_core.shipping import ship_generate
from cllm_core.stopping import raise_if_stopped
from cllm_core.trajectories import repetitive
from cllm_core.tuning import DecodingChoice, choose_decoding

Callback = Callable[[int, dict], None]


def finetune(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: str | Path, *,
             answers: dict[str, str] | None = None, probe: tuple[list[str], bool] = ([], False),
             log: Callable[[str], None] = print, on_metrics: Callback | None = None,
             on_samples: Callback | None = None, precision: str = "fp32",
             warn: Callable[[str], None] | None = None,
             progress: Callable[[int, int, dict], None] | None = None) -> CllmRecord:
    """Train the CLLM into `out_dir` (or reuse it); returns its record (`cllm.json`, where it is, whether reused).

    `answers` (prompt id -> text) are the ground-truth AR labels when `config.ar_labels` asks for them.
    `probe` (prompt texts, chat) are decoded with Jacobi every `sample_every` steps; `on_samples` gets
    tokens per forward, the repetition count and the texts. `on_metrics` gets the losses every `log_every`,
    `progress` (step, steps, figures) too. Training autocasts to the resolved `precision` over fp32 weights; a
    run that its `max_minutes` guard stops is announced through `warn`, published, and resumed by a rerun (the
    budget is each run's).
    """
    out_dir, warn = Path(out_dir), warn or log
    with _one_run_into(out_dir):
        if launched(config.launch):  # N processes under `accelerate launch`, their events replayed here
            held = held_cllm(config, model, store, out_dir, precision, log)
            return held or launch_finetune(config, model, store, out_dir, answers=answers, probe=probe,
                                           precision=precision, log=log, warn=warn, on_metrics=on_metrics,
                                           on_samples=on_samples, progress=progress)
        return train_here(config, model, store, out_dir, answers=answers, probe=probe, log=log, warn=warn,
                          on_metrics=on_metrics, on_samples=on_samples, progress=progress, precision=precision)


@contextmanager
def _one_run_into(out_dir: Path) -> Iterator[None]:
    """One fine-tuning a model directory (and its checkpoints): the caller holds `lock_path`, after any training
    processes an earlier launch left there are gone. Processes started by hand (torchrun) lock from rank 0."""
    if int(os.environ.get("RANK") or 0) != 0:
        yield
        return
    _check_writable(out_dir)  # one line before the lock beside it is made
    with exclusive(lock_path(out_dir), f"fine-tuning into {out_dir}"):
        wait_unheld(workers_lock_path(out_dir), 30, f"training processes an earlier launch into {out_dir} left")
        yield


def lock_path(out_dir: Path) -> Path:
    """The lock a fine-tuning into `out_dir` holds (beside it: `<out>.checkpoints` and `<out>.launch` are its too)."""
    return out_dir.parent / f".{out_dir.name}.lock"


def workers_lock_path(out_dir: Path) -> Path:
    """The lock every launched training process holds while it lives: a rerun waits for an earlier launch's."""
    return out_dir.parent / f".{out_dir.name}.workers.lock"


def train_here(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, *,
               answers: dict[str, str] | None, probe: tuple[list[str], bool], log: Callable[[str], None],
               warn: Callable[[str], None], on_metrics: Callback | None, on_samples: Callback | None,
               progress: Callable[[int, int, dict], None] | None, precision: str) -> CllmRecord:
    """`finetune` in this process: alone, or as one of the processes `accelerate launch` (or torchrun) started."""
    run = prepare(config, model, store, out_dir, answers, precision, log)
    if isinstance(run, CllmRecord):
        return run
    fitted = fit(run, probe, log, warn, on_metrics, on_samples, progress)
    return publish(run, fitted, log)


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
    """The reuse check (the held CLLM's record when it is the same run), then data, labels, the accelerator,
    the model and optimizer, and the checkpoint to resume from (checked against this config before any step)."""
    held, (resolved, tokenizer, data, fingerprint) = _held(config, model, store, out_dir, precision, log)
    if held is not None:
        return held
    _check_writable(out_dir)
    config = config.with_steps_for(epoch_size(data, config.objective))
    labels = None
    if config.ar_labels == "ground_truth":
        labels = label_ids(data, answers or {}, lambda text: tokenizer(text, add_special_tokens=False).input_ids,
                           tokenizer.eos_token_id)
    checkpoints = Checkpoints(out_dir.parent / f"{out_dir.name}.checkpoints", fingerprint)
    resume = checkpoints.latest()

    accelerator = _accelerator(MIXED_PRECISION[resolved.name], device=resolve_device(model.device))
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


def held_cllm(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, precision: str,
              log: Callable[[str], None]) -> CllmRecord | None:
    """The CLLM in `out_dir` when it was trained with this config, precision, teacher and trajectories."""
    return _held(config, model, store, out_dir, precision, log)[0]


def _held(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, precision: str,
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
    held = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if held.get("fingerprint") == fingerprint and held["metrics"]["stopped_early"]:
        log(f"the CLLM in {out_dir} was stopped by its guard at step {held['metrics']['train_steps']}; training again")
    elif held.get("fingerprint") == fingerprint:
        log(f"reusing the CLLM in {out_dir} (same config, precision, teacher and trajectories)")
        ship_generate(out_dir)  # the decoding it ships follows the engine installed now
        return CllmRecord.from_json(held, path=str(out_dir), reused=True), identity
    return None, identity


def _as_started(config: FinetuneConfig) -> FinetuneConfig:
    """The config as this process trains it: processes started by hand (torchrun: WORLD_SIZE) count as
    `launch.processes`, since `batch_size` is per process; a checkpoint or CLLM of another count is not this run."""
    started = int(os.environ.get("WORLD_SIZE") or 1)
    if config.launch.processes == 1 and started > 1:
        return config.model_copy(update={"launch": config.launch.model_copy(update={"processes": started})})
    return config


def fit(run: Training, probe: tuple[list[str], bool], log: Callable[[str], None], warn: Callable[[str], None],
        on_metrics: Callback | None, on_samples: Callback | None,
        progress: Callable[[int, int, dict], None] | None) -> dict:
    """The loop, from the resumed step to `steps` or the wall-clock guard: losses, logging, Jacobi samples,
    checkpoints. Returns the run's metrics."""
    config, data, accelerator, lm = run.config, run.data, run.accelerator, run.lm
    sampler = Sampler(data, config, run.labels, run.tokenizer.pad_token_id, accelerator.process_index,
                      accelerator.num_processes)
    per_epoch = epoch_size(data, config.objective) / (config.batch_size * accelerator.num_processes)
    probe_texts = probe[0][: config.sample_prompts]
    if probe_texts and accelerator.distributed_type == DistributedType.FSDP:
        log("Jacobi samples are off under FSDP (each pass would gather the sharded weights, and every process "
            "would have to stop at the same pass); the evaluation decodes the CLLM")
        probe_texts = []
    probe_ids = encode(run.tokenizer, probe_texts, chat=probe[1]) if probe_texts else None
    longest = max(len(r) for r in data.rows["response_ids"])
    forward = torch.compile(lm, dynamic=True) if config.compile else lm  # the same weights; samples decode uncompiled
    history = run.history
    window, window_tokens, window_start = [], 0, time.perf_counter()
    step, began, stopped_early, samples = run.start_step, time.perf_counter() - run.spent, False, None
    invoked = time.perf_counter()  # the guard's budget is this run's: a rerun resumes for another max_minutes
    while step < config.steps:
        raise_if_stopped()
        step += 1
        batch = sampler.batch(step)
        share = shares(accelerator, batch)
        with accelerator.autocast():
            if isinstance(batch, PackedBatch):
                loss, terms = forcing_loss(forward, _to(batch, accelerator.device), config, head=run.head,
                                           anchor=run.anchor, share=share)
            else:
                loss, terms = step_loss(forward, _to(batch, accelerator.device), config,
                                        reuse_ar=run.labels is None, head=run.head, anchor=run.anchor, share=share)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(lm.parameters(), config.grad_clip)
        run.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16's grad scaler skips steps of inf/NaN gradients:
            run.scheduler.step()  # the schedule counts the updates made
        run.optimizer.zero_grad(set_to_none=True)
        window.append(terms | {"grad_norm": grad_norm})  # device tensors: read once a log interval, not a step
        window_tokens += batch.tokens
        out_of_time = config.max_minutes is not None and _anyone(  # every process stops at the same step
            accelerator, time.perf_counter() - invoked > 60 * config.max_minutes)
        last = step == config.steps or out_of_time
        if step % config.log_every == 0 or last:
            metrics = _window_means(window)
            metrics |= {"lr": run.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / (time.perf_counter() - window_start)}
            metrics = _across_processes(accelerator, metrics) | {"epoch": step / per_epoch}  # the data seen
            history.append({"step": step, **metrics})
            if on_metrics and accelerator.is_main_process:
                on_metrics(step, metrics)
            if progress and accelerator.is_main_process:
                progress(step, config.steps, metrics)
            left = (time.perf_counter() - began) / step * (config.steps - step)
            log(f"step {step}/{config.steps} (epoch {metrics['epoch']:.2f}): loss {metrics['loss']:.3f} "
                f"(consistency {metrics['consistency']:.3f}, ar {metrics['ar']:.3f}), fixed-point agreement "
                f"{metrics['agreement']:.3f}, "
                f"{metrics['tokens_per_s']:.0f} tok/s, about {left:.0f} s left")
            window, window_tokens, window_start = [], 0, time.perf_counter()
        if probe_ids is not None and (step % config.sample_every == 0 or last):
            samples = sample(plain(accelerator.unwrap_model(lm)), run.tokenizer, probe_ids, data.n_tokens,
                             longest + data.n_tokens)
            if on_samples and accelerator.is_main_process:
                on_samples(step, samples)
            warning = " (collapse: the same tokens over and over)" if samples["repetitive"] else ""
            log(f"step {step}: Jacobi samples at {samples['tokens_per_forward']:.2f} tokens per forward, "
                f"{samples['repetitive']} of {len(samples['texts'])} repetitive{warning}")
        if (step % config.checkpoint_every == 0 and not last) or out_of_time:  # a stopped run resumes here
            rng = gather_object([rng_state()])  # every process's own RNG (a collective: all wait here)
            states = full_states(accelerator.unwrap_model(lm), run.optimizer)  # whole, gathered under FSDP
            if accelerator.is_main_process:
                run.checkpoints.save(step, states, run.scheduler, history,
                                     time.perf_counter() - began, rng, accelerator.scaler)
        if out_of_time:
            stopped_early = True
            warn(budget_warning("fine-tuning", step, config.steps, time.perf_counter() - invoked, run.precision,
                                "finetune.max_minutes") + f"; the next run resumes at step {step}")
            break

    skipped = step - run.scheduler.last_epoch  # (the scheduler's count is checkpointed: resumes keep it)
    if skipped > 0.1 * step:
        warn(f"fine-tuning: the fp16 grad scaler skipped {skipped} of {step} steps (inf or NaN gradients), so the "
             f"model was updated {step - skipped} times; train in bf16 or fp32 where the device has it, or lower "
             "finetune.lr")
    elif skipped:
        log(f"the fp16 grad scaler skipped {skipped} of {step} steps (inf or NaN gradients while it found its scale)")
    metrics = {"train_steps": step, "skipped_steps": skipped, "train_seconds": time.perf_counter() - began,
               "stopped_early": stopped_early,
               "train_blocks": len(data.items), "train_prompts": len(data.rows),
               "excluded_repetitive": data.excluded_repetitive, **{f"final_{k}": v for k, v in history[-1].items()
                                                                   if k != "step"}}
    if samples is not None:
        metrics |= {"sample_tokens_per_forward": samples["tokens_per_forward"],
                    "sample_repetitive": samples["repetitive"]}
    return metrics


def publish(run: Training, metrics: dict, log: Callable[[str], None]) -> CllmRecord:
    """Save the CLLM with its record (`cllm.json`) into `out_dir` in one step, from the main process; drop the
    checkpoints. Every process returns the published record."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(run.lm)  # whole on the main process (a collective under FSDP)
    if accelerator.is_main_process:  # one writer; the other processes read the record once it is published
        trained = accelerator.unwrap_model(run.lm)
        trained = trained.merge_and_unload() if run.config.lora else trained  # an ordinary model for what follows
        if run.config.decoding_sizes and accelerator.distributed_type != DistributedType.FSDP:
            choice = decoding_choice(trained, run, log)
            trained.config.cllm_decoding = choice.to_json()
            metrics = metrics | {"decoding_n_tokens": choice.n_tokens, "decoding_speedup": choice.speedup}
        record = CllmRecord(run.config.model_dump(), run.fingerprint, run.precision, run.model.model_dump(),
                            {"store": run.store, "fingerprint": run.data.fingerprint, "decoding": run.data.decoding},
                            run.data.n_tokens, metrics, run.history)
        with publish_dir(run.out_dir) as staging:
            save_cllm(trained, run.tokenizer, staging, record, None if run.config.lora else weights)
        if not metrics["stopped_early"]:  # a run its guard stopped keeps its checkpoint: the next resumes there
            shutil.rmtree(run.checkpoints.root, ignore_errors=True)
        log(f"saved the CLLM to {run.out_dir} after {metrics['train_steps']} steps in "
            f"{metrics['train_seconds']:.0f} s")
    accelerator.wait_for_everyone()
    return CllmRecord.from_json(json.loads((run.out_dir / "cllm.json").read_text()), path=str(run.out_dir))


def decoding_choice(lm, run: Training, log: Callable[[str], None]) -> DecodingChoice:
    """The block size and precision the trained model decodes fastest with here (cllm_core/tuning.py), measured on
    a few of its training prompts; said in one line."""
    rows = run.data.trained_rows[:DECODING_PROMPTS]
    prompts = [run.data.rows[row]["prompt_ids"] for row in rows]
    device = next(lm.parameters()).device
    precisions = ["fp32"] + (["bf16"] if resolve("auto", device).name == "bf16" else [])
    choice = choose_decoding(lm, prompts, precisions, tuple(run.config.decoding_sizes),
                             min(DECODING_NEW_TOKENS, run.data.decoding.get("max_new_tokens") or DECODING_NEW_TOKENS),
                             eos_token_id=run.tokenizer.eos_token_id)
    log(choice.describe())
    return choice


DECODING_PROMPTS, DECODING_NEW_TOKENS = 4, 128  # what the choice decodes: a minute or two of a CPU


def describe_cllm(record: CllmRecord) -> str:
    """One line on a CLLM record: where, trained or reused, steps, time and the final fixed-point agreement."""
    metrics = record.metrics
    return (f"{record.path} ({'reused' if record.reused else 'trained'}): n_tokens {record.n_tokens}, "
            f"{metrics['train_steps']} steps in {metrics['train_seconds']:.0f} s on {metrics['train_blocks']:,} "
            "blocks, "
            f"fixed-point agreement {metrics['final_agreement']:.3f}"
            + (f", Jacobi samples at {metrics['sample_tokens_per_forward']:.2f} tokens per forward"
               if "sample_tokens_per_forward" in metrics else ""))


def read_answers(path: str | Path) -> dict[str, str]:
    """prompt id -> the dataset's answer, from a prompts file of `cllm ingest` (ground-truth AR labels)."""
    table = pq.read_table(path, columns=["prompt_id", "answer"])
    return dict(zip(table.column("prompt_id").to_pylist(), table.column("answer").to_pylist()))


def read_probe(path: str | Path) -> tuple[list[str], bool]:
    """Held-out prompt texts to sample during training (none when the file is absent), and their chat flag."""
    if not Path(path).is_file():
        return [], False
    table, chat = read_prompt_table(path)
    return table.column("prompt").to_pylist(), chat


def step_loss(lm, batch: Batch, config: FinetuneConfig, reuse_ar: bool, head: torch.nn.Module | None = None,
              anchor: Anchor | None = None, share: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, dict]:
    """The weighted loss of one batch and its terms (floats) for logging.

    `share` (consistency, AR): each mean's factor from this process's positions to the whole step's across
    processes (`shares`), so that the processes' mean is the mean over every position of the step, and their
    averaged gradient the one process's of the same samples; (1, 1) alone.

    The AR sequences and the states go through the model in one forward; with `reuse_ar` (global loss and
    the teacher's response as AR labels) the fixed point's logits are read off the AR half, detached. With
    `head` (the model's output embedding, when `logits_head` vouches that it alone turns the last hidden state
    into logits), logits are computed only where a loss reads them: the AR labels and the state blocks, a few
    hundred of a step's thousands of positions, instead of a (rows, T, vocabulary) tensor. With `anchor`, the
    frozen starting model reads the AR sequences too, and its distributions at the AR labels are the anchor term's.
    """
    ar_ids, state_ids = batch.ar_ids, batch.state_ids
    width = max(ar_ids.shape[1], state_ids.shape[1])
    both = torch.cat([_widen(ar_ids, width), _widen(state_ids, width)])  # (B + S, T)
    at = _logits_at(lm, both, head)  # (rows, index) -> logits there
    rows = torch.arange(len(both), device=both.device)[:, None]
    index = _block_positions(batch)  # (S, n)
    student = at(rows[len(ar_ids):], index)  # (S, n, V)
    if reuse_ar and config.consistency == "global":  # one AR row per block serves its k states
        k = batch.states_per_block
        target = at(rows[: len(ar_ids)], index[::k]).detach().repeat_interleave(k, 0)  # (S, n, V)
    else:
        with torch.no_grad():
            target = _logits_at(lm, batch.target_ids, head)(rows[: len(batch.target_ids)], index)
    mask = consistency_mask(batch.states, batch.fixed_points, batch.block_len)  # (S, n)
    consistency = consistency_kl(student, target, mask) * share[0]
    labelled = batch.ar_mask.nonzero(as_tuple=True)  # (rows, positions) of the AR labels
    at_labels = at(*labelled)
    ar = ar_loss(at_labels, batch.ar_targets[labelled], torch.ones_like(labelled[0], dtype=torch.bool),
                 config.label_smoothing) * share[1]
    loss = config.consistency_weight * consistency + config.ar_weight * ar
    agreement = _share_of(student.argmax(-1) == batch.fixed_points, mask)
    terms = {"consistency": consistency.detach(), "ar": ar.detach(), "agreement": agreement * share[0]}
    if anchor is not None:
        loss, terms = _anchored(loss, terms, at_labels, anchor(ar_ids)(*labelled), config, share[1])
    return loss, {"loss": loss.detach(), **terms}


def forcing_loss(lm, batch: PackedBatch, config: FinetuneConfig, head: torch.nn.Module | None = None,
                 anchor: Anchor | None = None, share: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, dict]:
    """Jacobi Forcing's weighted loss of one packed batch and its terms, from one forward (cllm_core/forcing.py).

    The AR loss reads the clean stream (the AR forward of prompt + response under the mask); the consistency loss
    is KL(clean ‖ noisy) at each counted noisy position against the detached logits of its clean twin (the same
    block offset, so the same position id); agreement: the noisy position's argmax equals the fixed point's next
    token (the label of its clean twin). With `anchor`, the frozen starting model reads the same packed batch, and
    its clean-stream distributions at the AR labels are the anchor term's. `share`: as in `step_loss`.
    """
    device = batch.ids.device.type  # the mask in the autocast dtype: fp32's minimum is -inf in fp16
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    inputs = {"attention_mask": forcing.attention_bias(batch.kind, compute, batch.segment),
              "position_ids": batch.positions}
    at = _logits_at(lm, batch.ids, head, **inputs)
    labelled = batch.ar_mask.nonzero(as_tuple=True)  # row-major, so their flat indices are sorted
    at_labels = at(*labelled)  # (P, V)
    row, noisy, clean = batch.pairs.unbind(1)  # (K,) each
    student = at(row, noisy)[None]  # (1, K, V)
    width = batch.ids.shape[1]  # a clean twin is an AR label (it predicts the clean stream's next token): its
    twin = torch.searchsorted(labelled[0] * width + labelled[1], row * width + clean)  # logits are read once
    target = at_labels[twin].detach()[None]
    counted = torch.ones_like(row, dtype=torch.bool)[None]
    consistency = consistency_kl(student, target, counted) * share[0]
    ar = ar_loss(at_labels, batch.labels[labelled], torch.ones_like(labelled[0], dtype=torch.bool),
                 config.label_smoothing) * share[1]
    loss = config.consistency_weight * consistency + config.ar_weight * ar
    agreement = _share_of(student[0].argmax(-1) == batch.labels[row, clean], counted[0])
    terms = {"consistency": consistency.detach(), "ar": ar.detach(), "agreement": agreement * share[0]}
    if anchor is not None:
        loss, terms = _anchored(loss, terms, at_labels, anchor(batch.ids, **inputs)(*labelled), config, share[1])
    return loss, {"loss": loss.detach(), **terms}


def _share_of(hits: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """The share of counted positions that are hits, 1 when none is counted; a device tensor (no host sync)."""
    total = counted.sum()
    return torch.where(total > 0, (hits & counted).sum() / total.clamp(min=1), 1.0)


Anchor = Callable[..., Callable[..., torch.Tensor]]  # (ids, **forward inputs) -> (rows, positions) -> logits


def frozen_anchor(model: ModelConfig, device: torch.device) -> Anchor:
    """The starting model, frozen on `device`, as `_logits_at` without gradients: what the anchor term keeps."""
    frozen = load_model(model.model_copy(update={"device": "cpu"})).eval().requires_grad_(False).to(device)
    head = logits_head(frozen)

    def logits_at(ids: torch.Tensor, **inputs) -> Callable[..., torch.Tensor]:
        with torch.no_grad():  # and its weights need no gradient, so the head applied later builds no graph either
            return _logits_at(frozen, ids, head, **inputs)
    return logits_at


def _anchored(loss: torch.Tensor, terms: dict, student: torch.Tensor, start: torch.Tensor, config: FinetuneConfig,
              share: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The loss plus the anchor term: KL(starting model ‖ student) at the AR labels (student, start: (P, V))."""
    anchor = consistency_kl(student[None], start[None], torch.ones(student.shape[:1], dtype=torch.bool,
                                                                   device=student.device)[None]) * share
    return loss + config.anchor_weight * anchor, terms | {"anchor": anchor.detach()}


def with_lora(lm, config: FinetuneConfig):
    """`lm` with LoRA adapters (peft) on `config.lora`'s modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    if config.gradient_checkpointing:
        lm.enable_input_require_grads()  # recomputed blocks need an input that requires grad, frozen embeddings too
    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules  # peft's spelling
    return get_peft_model(lm, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                         target_modules=targets, task_type="CAUSAL_LM"))


def plain(lm):
    """The transformers model inside a peft wrapper (adapters active), or `lm` itself: what the engine decodes."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def logits_head(lm) -> torch.nn.Module | None:
    """The output embedding, if applying it to the last hidden state gives the model's logits exactly (a plain
    LM head: Llama, Qwen, SmolLM2); None for a model that transforms logits after it (soft-capping, scaling)."""
    head = lm.get_output_embeddings()
    probe = torch.arange(4, device=lm.device)[None] % lm.config.vocab_size
    with torch.no_grad():
        out = lm(input_ids=probe, output_hidden_states=True)
        exact = head is not None and torch.equal(head(out.hidden_states[-1]), out.logits)
    return head if exact else None


def _logits_at(lm, ids: torch.Tensor, head: torch.nn.Module | None, **inputs):
    """A function (rows, positions) -> the logits there (index tensors of one shape, the result that shape + V):
    the last hidden states through `head` only there, or (no head) read off the full logits. `inputs`: more
    arguments of the forward (a 4-D attention mask, position ids)."""
    if head is None:
        logits = lm(input_ids=ids, **inputs).logits
        return lambda rows, positions: logits[rows, positions]
    hidden = lm(input_ids=ids, logits_to_keep=1, output_hidden_states=True, **inputs).hidden_states[-1]  # (R, T, H)
    return lambda rows, positions: head(hidden[rows, positions])


def lr_factor(config: FinetuneConfig, step: int) -> float:
    """Linear warm-up, then cosine decay (over the steps after the warm-up) to `min_lr_ratio` at `steps`."""
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return warmup_cosine(step, config.warmup_steps, progress, floor=config.min_lr_ratio)


@torch.no_grad()
def sample(lm, tokenizer, prompts: tuple[torch.Tensor, torch.Tensor], n_tokens: int, max_new_tokens: int) -> dict:
    """Jacobi-decode the probe prompts: tokens per forward, how many responses repeat degenerately, texts."""
    was_training = lm.training
    lm.eval()
    ids, mask = (t.to(lm.device) for t in prompts)
    out = jacobi_generate(lm, ids, mask, n_tokens=n_tokens, max_new_tokens=max_new_tokens)
    lm.train(was_training)
    responses = [out.response(r, ids.shape[1]) for r in range(len(ids))]
    return {"tokens_per_forward": out.stats.tokens_per_forward,
            "repetitive": sum(repetitive(r) for r in responses),
            "texts": tokenizer.batch_decode(responses, skip_special_tokens=True)}


def save_cllm(lm, tokenizer, directory: Path, record: CllmRecord, weights: dict | None = None) -> None:
    """An HF directory `from_pretrained` loads as is, with `cllm_n_tokens` in its config, `cllm.json`, and the
    engine as `custom_generate/generate.py` (transformers' `generate(custom_generate=dir)` decodes with Jacobi)."""
    lm.config.cllm_n_tokens = record.n_tokens
    lm.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id, do_sample=False)
    lm.save_pretrained(directory, state_dict=weights)  # weights: gathered from FSDP's shards
    tokenizer.save_pretrained(directory)
    ship_generate(directory)
    (directory / "cllm.json").write_text(json.dumps(record.stored(), indent=2, sort_keys=True, default=str) + "\n")


def _accelerator(mixed_precision: str, device: torch.device) -> Accelerator:
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


def shares(accelerator: Accelerator, batch: Batch | PackedBatch) -> tuple[float, float]:
    """(consistency, AR): N x this process's counted positions / the step's across its N processes. A loss's
    mean times its share, averaged over the processes (as DDP averages gradients), is the mean over the step's
    positions: the processes train as one process would on their samples together. One small all-reduce."""
    if accelerator.num_processes == 1:
        return 1.0, 1.0
    if isinstance(batch, PackedBatch):
        counts = [len(batch.pairs), int(batch.ar_mask.sum())]
    else:
        counts = [int(consistency_mask(batch.states, batch.fixed_points, batch.block_len).sum()),
                  int(batch.ar_mask.sum())]
    total = accelerator.reduce(torch.tensor(counts, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return tuple(accelerator.num_processes * count / whole if whole else 1.0 for count, whole in zip(counts, total))


def _anyone(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process, on every process: a stop that one process decided alone (its own
    clock) would leave the others waiting in the next all-reduce forever. One tiny all-reduce per call."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0


def _window_means(window: list[dict]) -> dict[str, float]:
    """Each term's mean over the steps of a log interval: one read of the device for all of them."""
    keys = list(window[0])
    means = torch.stack([torch.stack([torch.as_tensor(w[key], dtype=torch.float32) for w in window]).mean()
                         for key in keys])
    return dict(zip(keys, means.tolist()))


def _across_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Under DDP every process logs the mean over processes (tokens/s: the sum), so all keep one history."""
    if accelerator.num_processes == 1:
        return metrics
    values = accelerator.reduce(torch.tensor(list(metrics.values()), device=accelerator.device), "mean").tolist()
    reduced = dict(zip(metrics, values))
    return reduced | {"tokens_per_s": reduced["tokens_per_s"] * accelerator.num_processes}


def _check_writable(out_dir: Path) -> None:
    """Fail before any step when the model directory cannot be written (probing it as the writer will)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = out_dir.parent / f".{out_dir.name}.write-test-{os.getpid()}"  # one per process under DDP
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"the model directory {out_dir} is not writable ({error.strerror or error})") from None


def _block_positions(batch: Batch) -> torch.Tensor:
    """(B, n): the logit position predicting each block token (block_start - 1 + i), clamped into range."""
    n = batch.states.shape[1]
    positions = batch.block_start[:, None] - 1 + torch.arange(n, device=batch.block_start.device)
    return positions.clamp(max=batch.state_ids.shape[1] - 1)


def _widen(ids: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=0)


def _to(batch: Batch | PackedBatch, device) -> Batch | PackedBatch:
    return type(batch)(**{name: getattr(batch, name).to(device) for name in type(batch).__dataclass_fields__})


