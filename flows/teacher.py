"""Flow of the demo teacher: a small Llama trained from scratch on synthetic math, cached in the work dir."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from cllm_core.runtime.config import Precision, TeacherConfig, TrackingConfig
from cllm_core.training.teacher import describe_teacher
from tasks.teacher import train_or_reuse_teacher
from tasks.tracking import mlflow_run


@flow(name="train-teacher")
def train_teacher(teacher: TeacherConfig = TeacherConfig(), work_dir: Path = Path("runs/demo"),
                  tracking: TrackingConfig = TrackingConfig(), precision: Precision = "auto") -> dict:
    """Build `<work_dir>/teacher` (an ordinary Hugging Face model directory) unless it is already there; a
    teacher below `teacher.min_accuracy` fails the flow and is not kept."""
    directory = work_dir / "teacher"
    with mlflow_run(tracking, work_dir, "teacher", {"teacher": teacher.model_dump(), "precision": precision}) as run:
        record = train_or_reuse_teacher(teacher, directory, precision, run.info.run_id)
        mlflow.set_tags({"cllm.teacher_fingerprint": record["fingerprint"], "cllm.reused": str(record["reused"]),
                         "cllm.precision": record.get("precision", "")})
        if record["reused"]:  # the training run streamed the curve; this run gets a copy so it reads complete
            for point in record["history"]:
                mlflow.log_metrics({k: v for k, v in point.items() if k != "step"}, step=point["step"])
        mlflow.log_metrics(record["metrics"])
        mlflow.log_artifact(str(directory / "teacher.json"))
    create_markdown_artifact(key="demo-teacher", markdown=f"**Demo teacher** {describe_teacher(record)}.")
    return record
