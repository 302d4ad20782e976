"""MLflow at the edge: one run per flow run, tagged with the Prefect run it records, artifacts in the work dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
from prefect.runtime import flow_run

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import TrackingConfig


def tracking_uri(tracking: TrackingConfig, work_dir: Path) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI (its credentials moved out), else a SQLite store in the work dir."""
    move_credentials()
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work_dir.resolve() / 'mlflow.db'}"


def move_credentials() -> None:
    """Move credentials written into $MLFLOW_TRACKING_URI (https://user:password@host) to MLFLOW_TRACKING_USERNAME
    and MLFLOW_TRACKING_PASSWORD, where MLflow reads them, and keep the bare URI: MLflow prints the tracking URI
    after every run, and this project shows, links and passes it on to workers.

    Both come from the URI when it has them; a user name alone (a token) is refused: MLflow would send nothing.
    """
    parts = urlsplit(os.environ.get("MLFLOW_TRACKING_URI", ""))
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return
    if parts.password is None:
        raise UserError("MLFLOW_TRACKING_URI carries a user name but no password; put a token in "
                        "MLFLOW_TRACKING_TOKEN and leave it out of the URI")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    os.environ["MLFLOW_TRACKING_URI"] = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail in one line, before any work, when the tracking URI is a server that does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UserError(f"the MLflow tracking server {uri} does not answer ({reason}); start it or set "
                              "MLFLOW_TRACKING_URI / tracking.uri to a reachable one") from None


@contextmanager
def mlflow_run(tracking: TrackingConfig, work_dir: Path, stage: str, params: dict,
               resume: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start (or nest under the active) MLflow run for one stage; params are flattened `a.b` keys.

    `resume`: a retried Prefect flow run continues the MLflow run it started the first time (found by tag).
    """
    uri = tracking_uri(tracking, work_dir)
    if mlflow.active_run() is None:  # a nested stage's server was checked by the run around it
        check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(tracking.experiment) is None:
        local = not uri.startswith(("http://", "https://"))  # a server keeps artifacts where it is configured to
        artifacts = (work_dir / "mlartifacts").resolve().as_uri() if local else None
        mlflow.create_experiment(tracking.experiment, artifact_location=artifacts)
    mlflow.set_experiment(tracking.experiment)
    tags = {"cllm.stage": stage, "prefect.flow_run_id": str(flow_run.id or ""),
            "prefect.flow_run_name": str(flow_run.name or "")}
    earlier = None
    if resume and flow_run.id:
        found = mlflow.search_runs(experiment_names=[tracking.experiment], output_format="list", max_results=1,
                                   filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}' and "
                                                 f"tags.`cllm.stage` = '{stage}'")
        earlier = found[0].info.run_id if found else None
    with mlflow.start_run(run_id=earlier, run_name=None if earlier else stage,
                          nested=mlflow.active_run() is not None, tags=None if earlier else tags) as run:
        if earlier is None:
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


HEADLINE_SUFFIXES = (".tokens_per_forward", ".speedup", ".accuracy", ".exact_match", "eval_accuracy",
                     "final_agreement", "sample_tokens_per_forward", "train_seconds", "prompts_per_s")


def compare_runs(run_ids: list[str], work_dir: Path, tracking: TrackingConfig) -> tuple[list[str], list[list[str]]]:
    """Column names (one per run) and rows: the params that differ between the runs, then headline metrics.

    No ids: the two latest evaluation runs of the experiment.
    """
    mlflow.set_tracking_uri(tracking_uri(tracking, work_dir))
    found = [_run(run_id) for run_id in run_ids] or latest_evaluations(tracking.experiment)
    columns = [f"{run.info.run_name} {run.info.run_id[:8]}" for run in found]
    params = sorted({key for run in found for key in run.data.params})
    rows = [[key, *(run.data.params.get(key, "-") for run in found)] for key in params
            if len({run.data.params.get(key) for run in found}) > 1]
    metrics = sorted({key for run in found for key in run.data.metrics if key.endswith(HEADLINE_SUFFIXES)})
    rows += [[key, *(f"{run.data.metrics[key]:.4g}" if key in run.data.metrics else "-" for run in found)]
             for key in metrics]
    return columns, rows


def latest_evaluations(experiment: str = "cllm", count: int = 2) -> list:
    """The experiment's `count` latest evaluation runs in the current tracking store, newest first."""
    found = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.`cllm.stage` = 'evaluate'",
                               order_by=["start_time DESC"], max_results=count, output_format="list")
    if len(found) < count:
        raise UserError(f"fewer than {count} evaluation runs in experiment {experiment!r}; give run ids")
    return found


def _run(run_id: str):
    try:
        return mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"no MLflow run {run_id} in {mlflow.get_tracking_uri()}") from None
