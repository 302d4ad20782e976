"""Prefect tasks of the teacher: train the demo teacher, or fine-tune a domain teacher (figures streamed live),
or reuse the cached one."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from cllm_core.runtime.config import SftConfig, TeacherConfig
from cllm_core.training.sft import build_sft_teacher
from cllm_core.training.teacher import build_teacher
from tasks.progress import reporter


@task(name="build-teacher")
def train_or_reuse_teacher(config: TeacherConfig, directory: Path, precision: str = "auto",
                           run_id: str | None = None) -> dict:
    """The teacher's record (config, fingerprint, precision, metrics, loss history, reused)."""
    logger = get_run_logger()
    return build_teacher(config, directory, log=logger.info, warn=logger.warning, precision=precision,
                         progress=reporter("teacher", run_id))


@task(name="fine-tune-teacher")
def fine_tune_teacher(config: SftConfig, prompts_dir: Path, directory: Path, check: str, precision: str = "auto",
                      run_id: str | None = None) -> dict:
    """The domain teacher's record (config, fingerprint, precision, metrics with accuracy before and after, loss
    history, reused): `config.model` fine-tuned on the ingested answers, or the one made before from the same."""
    logger = get_run_logger()
    return build_sft_teacher(config, prompts_dir, directory, check, log=logger.info, warn=logger.warning,
                             precision=precision, progress=reporter("teacher", run_id))
