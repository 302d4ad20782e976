"""Flows of the teacher, cached in the work dir: the demo teacher (a small Llama trained from scratch on synthetic
math), or a domain teacher (a pretrained model fine-tuned on the prompt source's answers)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from cllm_core.runtime.config import IngestConfig, Precision, SftConfig, TeacherConfig, TrackingConfig
from cllm_core.training.sft import describe_sft
from cllm_core.training.teacher import describe_teacher
from tasks.ingest import write_prompts
from tasks.teacher import fine_tune_teacher, train_or_reuse_teacher
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
        _log_record(record, directory)
    create_markdown_artifact(key="demo-teacher", markdown=f"**Demo teacher** {describe_teacher(record)}.")
    return record


@flow(name="sft-teacher")
def sft_teacher(sft: SftConfig, ingest: IngestConfig, work_dir: Path = Path("runs/demo"),
                tracking: TrackingConfig = TrackingConfig(), precision: Precision = "auto",
                check: Literal["auto", "math", "exact"] = "auto") -> dict:
    """Make `<work_dir>/teacher` a domain teacher, `sft.model` fine-tuned on the answers of `ingest`'s source (its
    train split up to `sft.max_train`, ingested into `<work_dir>/sft/prompts`), unless the same one is there; a
    teacher below `sft.min_accuracy` fails the flow and is not kept. `check`: how held-out answers are judged, as
    the evaluation judges them (`evaluate.check`; auto: the source preset's)."""
    directory, prompts = work_dir / "teacher", work_dir / "sft" / "prompts"
    params = {"sft": sft.model_dump(), "ingest": ingest.model_dump(), "precision": precision, "check": check}
    with mlflow_run(tracking, work_dir, "teacher", params) as run:
        write_prompts(sft.ingestion(ingest), sft.model, prompts)
        record = fine_tune_teacher(sft, prompts, directory, ingest.resolved_check(check), precision, run.info.run_id)
        mlflow.set_tags({"cllm.teacher_fingerprint": record["fingerprint"], "cllm.reused": str(record["reused"]),
                         "cllm.precision": record.get("precision", ""), "cllm.teacher_base": sft.model.name_or_path})
        _log_record(record, directory)
    create_markdown_artifact(key="domain-teacher", markdown=f"**Domain teacher** {describe_sft(record)}.")
    return record


def _log_record(record: dict, directory: Path) -> None:
    """A teacher's figures into the active run; a reused teacher's curve copied, so that the run reads complete
    (the training run streamed it)."""
    if record["reused"]:
        for point in record["history"]:
            mlflow.log_metrics({k: v for k, v in point.items() if k != "step"}, step=point["step"])
    mlflow.log_metrics({k: v for k, v in record["metrics"].items() if isinstance(v, int | float)})
    mlflow.log_artifact(str(directory / "teacher.json"))
