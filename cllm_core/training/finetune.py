"""Stage 3: consistency fine-tuning, teacher + trajectories -> a CLLM in an ordinary HF model directory.

A plain loop over `accelerate`: in this process (CPU, one GPU), or, with `finetune.launch` asking for more processes
or FSDP, in processes that `finetune` starts with `accelerate launch` and waits for (cllm_core/training/launch.py);
the same loop either way, and a process started by hand (torchrun) runs it too. Two objectives: Jacobi Forcing
(`objective: jacobi_forcing`: whole responses packed with a noisy state per block under a noise-conditioned mask,
cllm_core/training/forcing.py) and the paper's (cllm_core/training/objectives.py). Checkpoints (weights as
safetensors, the rest read back with `weights_only=True`) let a killed run resume at the same step with the same
batches; the model directory appears only when training finished. The same config, teacher and data reuse the
finished directory.

This module is the entry point: the lock on the model directory and the choice of where to train. `setup`
prepares a run (and finds a finished one to reuse), `loop` trains it, `objectives` holds the losses, `publish`
writes the CLLM.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

from cllm_core.data.collect import read_prompt_table
from cllm_core.runtime.config import FinetuneConfig, ModelConfig
from cllm_core.runtime.files import exclusive, wait_unheld
from cllm_core.runtime.records import CllmRecord
from cllm_core.training.launch import launch_finetune, launched
from cllm_core.training.loop import Callback, fit
from cllm_core.training.publish import publish
from cllm_core.training.setup import check_writable, finished_cllm, prepare


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
            held = finished_cllm(config, model, store, out_dir, precision, log)
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
    check_writable(out_dir)  # one line before the lock beside it is made
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
