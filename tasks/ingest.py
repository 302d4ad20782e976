"""Prefect tasks of stage 1: ingest prompts."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from cllm_core.data.ingest import ingest
from cllm_core.runtime.config import IngestConfig, ModelConfig


@task(name="write-prompts")
def write_prompts(config: IngestConfig, tokenizer: ModelConfig, out_dir: Path) -> dict:
    """Read the source, render and filter its prompts, write train/eval Parquet; returns the manifest."""
    logger = get_run_logger()
    manifest = ingest(config, tokenizer, out_dir, log=logger.info)
    logger.info("%d train and %d eval prompts in %s (template %s)", manifest["train_rows"], manifest["eval_rows"],
                out_dir, manifest["template"])
    return manifest
