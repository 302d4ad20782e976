"""Prefect task of the demo teacher: train it (figures streamed live), or reuse the cached one."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from cllm_core.runtime.config import TeacherConfig
from cllm_core.training.teacher import build_teacher
from tasks.progress import reporter


@task(name="build-teacher")
def train_or_reuse_teacher(config: TeacherConfig, directory: Path, precision: str = "auto",
                           run_id: str | None = None) -> dict:
    """The teacher's record (config, fingerprint, precision, metrics, loss history, reused)."""
    logger = get_run_logger()
    return build_teacher(config, directory, log=logger.info, warn=logger.warning, precision=precision,
                         progress=reporter("teacher", run_id))
