"""Flow of stage 3: teacher + trajectory shards -> `<work_dir>/cllm`, a Hugging Face model directory.

Losses, learning rate, gradient norm, tokens/s and Jacobi samples stream to the stage's MLflow run while it
trains; the finished model is logged there as an MLflow pyfunc that decodes with Jacobi, and registered.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from cllm_core.runtime.config import FinetuneConfig, ModelConfig, Precision, TrackingConfig
from cllm_core.runtime.records import CllmRecord
from cllm_core.training.finetune import describe_cllm
from tasks.finetune import log_cllm, train_cllm
from tasks.tracking import mlflow_run


@flow(name="consistency-finetune")
def consistency_finetune(finetune: FinetuneConfig, model: ModelConfig, work_dir: Path = Path("runs/demo"),
                         store: str | None = None, tracking: TrackingConfig = TrackingConfig(),
                         precision: Precision = "auto", out_dir: Path | None = None,
                         stage: str = "finetune") -> CllmRecord:
    """Fine-tune the teacher on `<work_dir>/trajectories` (or `store`) into `<work_dir>/cllm` (or `out_dir`), or
    reuse it. `stage`: the MLflow run's `cllm.stage` tag (finetune-round2 for a second round)."""
    store, out_dir = store or str(work_dir / "trajectories"), out_dir or work_dir / "cllm"
    with mlflow_run(tracking, work_dir, stage, {"finetune": finetune.model_dump(), "model": model.model_dump(),
                                                     "store": store, "precision": precision}) as run:
        record = train_cllm(finetune, model, store, out_dir, work_dir / "prompts", run.info.run_id, precision)
        data = record.trajectories["fingerprint"]
        mlflow.log_params({"data_fingerprint": data, "n_tokens": record.n_tokens})
        mlflow.set_tags({"cllm.fingerprint": record.fingerprint, "cllm.reused": str(record.reused),
                         "cllm.precision": record.precision})
        if record.reused:  # the training run logged the curve; this run gets a copy so it reads complete
            for point in record.history:
                mlflow.log_metrics({k: v for k, v in point.items() if k != "step"}, step=point["step"])
        mlflow.log_metrics({k: float(v) for k, v in record.metrics.items() if isinstance(v, int | float)})
        mlflow.log_input(MetaDataset(LocalArtifactDatasetSource(store), name="jacobi-trajectories", digest=data[:8]),
                         context="training")
        mlflow.log_artifact(str(out_dir / "cllm.json"))
        record = dataclasses.replace(record, logged=log_cllm(out_dir, finetune.registered_model, record.fingerprint))
    create_markdown_artifact(key="cllm", markdown=f"**CLLM** {describe_cllm(record)}.")
    return record
