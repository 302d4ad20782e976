"""Flow of stage 1: a prompt source -> `<work_dir>/prompts/{train,eval}.parquet`, recorded in MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_table_artifact

from cllm_core.data.ingest import manifest_counts
from cllm_core.runtime.config import IngestConfig, ModelConfig, TrackingConfig
from tasks.ingest import write_prompts
from tasks.tracking import mlflow_run


@flow(name="ingest-prompts")
def ingest_prompts(ingest: IngestConfig, model: ModelConfig, work_dir: Path = Path("runs/demo"),
                   tracking: TrackingConfig = TrackingConfig()) -> dict:
    """Ingest prompts for `model` (its tokenizer counts prompt tokens and renders chat templates)."""
    out_dir = work_dir / "prompts"
    with mlflow_run(tracking, work_dir, "ingest", {"ingest": ingest.model_dump(), "model": model.model_dump()}):
        manifest = write_prompts(ingest, model, out_dir)
        counts = manifest_counts(manifest)
        mlflow.log_metrics(counts)
        mlflow.log_artifacts(str(out_dir), artifact_path="prompts")
    create_table_artifact(key="ingest-counts", table=[{"count": key, "value": value} for key, value in counts.items()],
                          description=f"Prompts from {ingest.source}, template {manifest['template']}")
    return manifest
