"""Prefect task of stage 4: evaluate the models on the eval prompts into a report directory."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from cllm_core.evaluation.evaluate import run_evaluation
from cllm_core.runtime.config import EvalConfig, ModelConfig
from cllm_core.runtime.records import Evaluation


@task(name="evaluate-models")
def evaluate_models(config: EvalConfig, models: dict[str, ModelConfig], prompts: Path, out_dir: Path,
                    precision: str = "auto") -> Evaluation:
    """Summary rows, the per-sample Parquet and the PNGs (paths) of one evaluation."""
    logger = get_run_logger()
    return run_evaluation(config, models, prompts, out_dir, log=logger.info, precision=precision, warn=logger.warning)
