"""Flow of the demo teacher: a small Llama trained from scratch on synthetic math, cached in the work dir."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from cllm_core.config import TeacherConfig, TrackingConfig
from cllm_core.teacher import describe_teacher
from tasks.teacher import train_or_reuse_teacher
from tasks.tracking import mlflow_run


@flow(name="train-teacher")
def train_teacher(teacher: TeacherConfig = TeacherConfig(), work_dir: Path = Path("runs/demo"),
                  tracking: TrackingConfig = TrackingConfig()) -> dict:
    """Build `<work_dir>/teacher` (an ordinary Hugging Face model directory) unless it is already there."""
    directory = work_dir / "teacher"
    with mlflow_run(tracking, work_dir, "teacher", {"teacher": teacher.model_dump()}):
        record = train_or_reuse_teacher(teacher, directory)
        mlflow.set_tags({"cllm.teacher_fingerprint": record["fingerprint"], "cllm.reused": str(record["reused"])})
        for point in record["history"]:
            mlflow.log_metrics({"train_loss": point["train_loss"], "lr": point["lr"]}, step=point["step"])
        mlflow.log_metrics(record["metrics"])
        mlflow.log_artifact(str(directory / "teacher.json"))
    create_markdown_artifact(key="demo-teacher", markdown=f"**Demo teacher** {describe_teacher(record)}.")
    return record
