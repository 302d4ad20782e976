"""MLflow at the edge: one run per flow run, tagged with the Prefect run it records, artifacts in the work dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from prefect.runtime import flow_run

from cllm_core.config import TrackingConfig


def tracking_uri(tracking: TrackingConfig, work_dir: Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the work dir."""
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work_dir.resolve() / 'mlflow.db'}"


@contextmanager
def mlflow_run(tracking: TrackingConfig, work_dir: Path, stage: str, params: dict) -> Iterator[mlflow.ActiveRun]:
    """Start (or nest under the active) MLflow run for one stage; params are flattened `a.b` keys."""
    mlflow.set_tracking_uri(tracking_uri(tracking, work_dir))
    if mlflow.get_experiment_by_name(tracking.experiment) is None:
        artifacts = (work_dir / "mlartifacts").resolve()
        mlflow.create_experiment(tracking.experiment, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(tracking.experiment)
    tags = {"cllm.stage": stage, "prefect.flow_run_id": str(flow_run.id or ""),
            "prefect.flow_run_name": str(flow_run.name or "")}
    with mlflow.start_run(run_name=stage, nested=mlflow.active_run() is not None, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield run


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat
