"""Prefect task of stage 3: fine-tune the CLLM, streaming losses and Jacobi samples to the MLflow run."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from prefect import get_run_logger, task

from cllm_core.config import FinetuneConfig, ModelConfig
from cllm_core.finetune import finetune, read_answers, read_probe
from cllm_core.records import CllmRecord
from tasks.progress import log_figures, reporter


@task(name="train-cllm")
def train_cllm(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, prompts_dir: Path,
               run_id: str, precision: str = "auto") -> CllmRecord:
    """Train (or reuse) the CLLM in `out_dir`; every logging step and sample lands in MLflow run `run_id`."""
    client, logger = MlflowClient(), get_run_logger()

    def samples(step: int, found: dict) -> None:
        log_figures(client, run_id, step, found, prefix="sample_")
        client.log_text(run_id, "\n\n---\n\n".join(found["texts"]), f"samples/step-{step:06d}.txt")

    answers = read_answers(prompts_dir / "train.parquet") if config.ar_labels == "ground_truth" else None
    return finetune(config, model, store, out_dir, answers=answers, probe=read_probe(prompts_dir / "eval.parquet"),
                    log=logger.info, warn=logger.warning, precision=precision,
                    on_metrics=lambda step, figures: log_figures(client, run_id, step, figures), on_samples=samples,
                    progress=reporter("fine-tuning", None))  # the terminal's; on_metrics streams to MLflow


@task(name="log-cllm")
def log_cllm(directory: Path, registered_model: str | None) -> dict:
    """Log the CLLM directory as an MLflow transformers model in the active run; register it when named."""
    import os

    import mlflow
    import torch
    import transformers

    from cllm_core import load_model, load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # log_model looks for a hub model card; a local model has none
    source = ModelConfig(name_or_path=str(directory))
    info = mlflow.transformers.log_model(
        transformers_model={"model": load_model(source), "tokenizer": load_tokenizer(source)}, name="cllm",
        task="text-generation", registered_model_name=registered_model,
        pip_requirements=[f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"])
    return {"model_uri": info.model_uri, "registered_model": registered_model,
            "version": info.registered_model_version}
