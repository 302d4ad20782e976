"""Prefect task of the demo teacher: train it, or reuse the cached one."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from cllm_core.config import TeacherConfig
from cllm_core.teacher import build_teacher


@task(name="build-teacher")
def train_or_reuse_teacher(config: TeacherConfig, directory: Path) -> dict:
    """The teacher's record (config, fingerprint, metrics, loss history, reused)."""
    return build_teacher(config, directory, log=get_run_logger().info)
