"""The fine-tuning loop: from the resumed step to the last or the wall-clock guard, one optimizer step a batch,
its terms read from the device once a log interval, Jacobi samples of held-out prompts, checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from cllm_core.data.prompts import encode
from cllm_core.data.samples import epoch_size
from cllm_core.data.trajectories import repetitive
from cllm_core.engine.jacobi import jacobi_generate
from cllm_core.engine.stopping import raise_if_stopped
from cllm_core.runtime.guards import budget_warning, check_divergence
from cllm_core.training.batches import Batch, PackedBatch, Sampler
from cllm_core.training.checkpoints import full_states, rng_state
from cllm_core.training.objectives import ar_index, forcing_loss, process_shares, step_loss
from cllm_core.training.setup import Training, base_model

Callback = Callable[[int, dict], None]  # (step, figures): metrics or samples, from the main process


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
        share = process_shares(accelerator, batch)
        labelled = tuple(i.to(accelerator.device) for i in ar_index(batch))  # found on the host: no device sync
        with accelerator.autocast():
            if isinstance(batch, PackedBatch):
                loss, terms = forcing_loss(forward, to_device(batch, accelerator.device), config, head=run.head,
                                           anchor=run.anchor, share=share, labelled=labelled)
            else:
                loss, terms = step_loss(forward, to_device(batch, accelerator.device), config,
                                        reuse_ar=run.labels is None, head=run.head, anchor=run.anchor, share=share,
                                        labelled=labelled)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(lm.parameters(), config.grad_clip)
        run.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16's grad scaler skips steps of inf/NaN gradients:
            run.scheduler.step()  # the schedule counts the updates made
        run.optimizer.zero_grad(set_to_none=True)
        window.append(terms | {"grad_norm": grad_norm})  # device tensors: read once a log interval, not a step
        window_tokens += batch.tokens
        out_of_time = config.max_minutes is not None and on_any_process(  # every process stops at the same step
            accelerator, time.perf_counter() - invoked > 60 * config.max_minutes)
        last = step == config.steps or out_of_time
        if step % config.log_every == 0 or last:
            metrics = window_means(window)
            metrics |= {"lr": run.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / (time.perf_counter() - window_start)}
            metrics = mean_over_processes(accelerator, metrics) | {"epoch": step / per_epoch}  # the data seen
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
            check_divergence(history, config.max_ar_rise, config.lora is not None)  # every process: the same means
        if probe_ids is not None and (step % config.sample_every == 0 or last):
            samples = sample(base_model(accelerator.unwrap_model(lm)), run.tokenizer, probe_ids, data.n_tokens,
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


def on_any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process, on every process: a stop that one process decided alone (its own
    clock) would leave the others waiting in the next all-reduce forever. One tiny all-reduce per call."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0


def window_means(window: list[dict]) -> dict[str, float]:
    """Each term's mean over the steps of a log interval: one read of the device for all of them."""
    keys = list(window[0])
    means = torch.stack([torch.stack([torch.as_tensor(w[key], dtype=torch.float32) for w in window]).mean()
                         for key in keys])
    return dict(zip(keys, means.tolist()))


def mean_over_processes(accelerator: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Under DDP every process logs the mean over processes (tokens/s: the sum), so all keep one history."""
    if accelerator.num_processes == 1:
        return metrics
    values = accelerator.reduce(torch.tensor(list(metrics.values()), device=accelerator.device), "mean").tolist()
    reduced = dict(zip(metrics, values))
    return reduced | {"tokens_per_s": reduced["tokens_per_s"] * accelerator.num_processes}


def to_device(batch: Batch | PackedBatch, device) -> Batch | PackedBatch:
    return type(batch)(**{name: getattr(batch, name).to(device) for name in type(batch).__dataclass_fields__})
