"""Flows of stage 2: teacher + prompts -> `<work_dir>/trajectories/shard-NNNNN.parquet`, resumable.

`collect_trajectories` plans the shards and runs those not done. Locally, shards run one after another per
device (`collect.devices`, or the model's device), devices side by side, in threads or in Dask worker
processes (`task_runner`). With `deployment`, each shard is a flow run of `collect_shard` on a work pool
(`run_deployment`), every worker writing to the shared store.
Either way a failed shard does not stop the others, and the flow fails at the end naming the shards to retry.
Progress goes to a Prefect progress artifact and to `shard_listener` (the terminal bar of `cllm collect`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from prefect import allow_failure, flow
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import TerminationSignal
from prefect.runtime import deployment as deployment_runtime
from prefect.runtime import flow_run
from prefect.states import Cancelled, Cancelling, Scheduled
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from cllm_core.data.shards import ShardsFailed, ShardStore
from cllm_core.engine.errors import UserError
from cllm_core.engine.stopping import STOP_FILE, on_stop_request, request_stop
from cllm_core.runtime.config import CollectConfig, ModelConfig, Precision, TrackingConfig
from cllm_core.runtime.guards import check_collected, check_repetition
from cllm_core.runtime.records import CollectionPlan, ShardManifest, collection_figures
from tasks.collect import collect_one_shard, plan_collection
from tasks.tracking import mlflow_run

ShardListener = Callable[[int, int, int | None, dict | None], None]
shard_listener: ContextVar[ShardListener | None] = ContextVar("shard_listener", default=None)
"""Told what the progress artifact is told: (shards collected, shards in all, the shard that just ended or None
at the start, its manifest or None if it failed). `cllm collect` sets it to drive its terminal bar."""


@flow(name="collect-shard")
def collect_shard_flow(collect: CollectConfig, model: ModelConfig, prompts: Path, store: str, shard: int,
                       record: dict) -> dict:
    """One shard as its own flow run: the unit a work pool's workers take (`prefect.yaml`: collect-shard)."""
    return collect_one_shard(collect, model, prompts, store, shard, record)


@flow(name="collect-trajectories")
def collect_trajectories(collect: CollectConfig, model: ModelConfig, work_dir: Path = Path("runs/demo"),
                         store: str | None = None, deployment: str | None = None,
                         tracking: TrackingConfig = TrackingConfig(), precision: Precision = "auto",
                         stage: str = "collect") -> dict:
    """Collect every shard of `<work_dir>/prompts/train.parquet` not already done in the store; with
    `deployment` (e.g. collect-shard/collect-shard), as one flow run per shard on that deployment's pool. The
    teacher decodes in the resolved `precision`, recorded with the store. A store whose responses are mostly
    degenerate repetition (above `collect.max_repetitive`) fails the flow, so nothing is fine-tuned on it.
    `stage`: the MLflow run's `cllm.stage` tag (collect-round2 for a second round)."""
    prompts, store = work_dir / "prompts" / "train.parquet", store or str(work_dir / "trajectories")
    with mlflow_run(tracking, work_dir, stage, {"collect": collect.model_dump(), "model": model.model_dump(),
                                                    "store": store, "deployment": deployment,
                                                    "precision": precision}):
        work = plan_collection(collect, model, prompts, store, precision)
        mlflow.set_tag("cllm.precision", work.collection["precision"])
        progress = _Progress(work)
        run = _on_pool if deployment else _locally
        manifests, failed = run(collect, model, prompts, store, work, progress, deployment)
        summary = {"shards": work.shards, "shards_skipped": len(work.done), "shards_collected": len(manifests),
                   "shards_failed": len(failed), **collection_figures([*manifests.values()])}
        if manifests:
            create_table_artifact(key="collect-shards", table=[{key: getattr(m, key) for key in ShardManifest.COLUMNS}
                                                               for m in manifests.values()])
        mlflow.log_metrics(summary)
        mlflow.log_input(MetaDataset(LocalArtifactDatasetSource(store), name="jacobi-trajectories",
                                     digest=work.config_hash[:8]), context="collect")
        if failed:
            raise ShardsFailed(f"shards {failed} failed; run `{_retry_command()}` or the same command again: "
                               "finished shards are skipped")
        every = [ShardManifest.from_json(ShardStore(store).manifest(shard)) for shard in range(work.shards)]
        check_collected(every, collect.finished_only, collect.jacobi.max_new_tokens)
        check_repetition(every, collect.max_repetitive)
    return summary | {"store": store, "config_hash": work.config_hash}


def _retry_command() -> str:
    """A run started by `cllm collect` has no deployment, and `prefect flow-run retry` needs its code then."""
    entrypoint = "" if deployment_runtime.id else f" --entrypoint {os.path.relpath(__file__)}:collect_trajectories"
    return f"prefect flow-run retry {flow_run.id}{entrypoint}"


def task_runner(name: Literal["threads", "dask"], collect: CollectConfig, model: ModelConfig) -> TaskRunner:
    """What runs the local shard chains: Prefect's thread pool, or a local Dask cluster with one worker
    process per device chain (the dask extra). Use as `collect_trajectories.with_options(task_runner=...)`."""
    if name == "threads":
        return ThreadPoolTaskRunner()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise UserError("the dask task runner needs the dask extra: pip install 'cllm-pipeline[dask]'") from None
    with get_client(sync_client=True) as client:  # starts the temporary server now if there is no other
        api = str(client.api_url)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the shard lines are the news, not the nannies
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": len(set(_devices(collect, model))), "threads_per_worker": 1, "processes": True,
        "dashboard_address": None,
        "env": {"PREFECT_API_URL": api,  # without it, each worker would start a temporary server of its own
                STOP_FILE: _stop_file()}})  # a stop request here reaches the workers' Jacobi loops


def _stop_file() -> str:
    """A file that this process creates when a stop is requested here; the Dask workers watch it (`STOP_FILE`)."""
    path = Path(tempfile.mkdtemp(prefix="cllm-stop-")) / "stop"
    on_stop_request(path.touch)
    return str(path)


def _devices(collect: CollectConfig, model: ModelConfig) -> list[str]:
    return collect.devices or [model.device]


def _locally(collect, model, prompts, store, work, progress, deployment) -> tuple[dict, list[int]]:
    devices = _devices(collect, model)
    last, futures = {}, {}
    for i, shard in enumerate(work.todo):  # one chain of shards per device
        device = devices[i % len(devices)]
        futures[shard] = collect_one_shard.submit(
            collect, model.model_copy(update={"device": device}), prompts, store, shard, work.collection,
            wait_for=[allow_failure(last[device])] if device in last else None)
        last[device] = futures[shard]
    manifests, failed = {}, []
    try:
        for shard, future in futures.items():
            future.wait()
            if future.state.is_completed():
                manifests[shard] = future.result()
            else:
                failed.append(shard)
            progress.ended(shard, manifests.get(shard))
    except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C, SIGTERM, a cancellation: Prefect's thread pool would
        request_stop()  # wait for the running shards to finish; they stop at their next Jacobi pass instead
        raise
    return manifests, failed


def _on_pool(collect, model, prompts, store, work, progress, deployment, poll_s: float = 2.0):
    """One child flow run per shard; a parent retry gets the same children back and reschedules failed ones
    (docs/design/prefect_mlflow.md, "Shard runs on a work pool": the idempotency key alone would return the
    failed child unchanged)."""
    runs = {}
    with get_client(sync_client=True) as client:
        for shard in work.todo:
            child = run_deployment(
                deployment, timeout=0, idempotency_key=f"{flow_run.id}-shard-{shard}",
                flow_run_name=f"shard-{shard:05d}", tags=["cllm", f"shard:{shard}"],
                parameters={"collect": collect.model_dump(), "model": model.model_dump(), "prompts": str(prompts),
                            "store": store, "shard": shard, "record": work.collection})
            if child.state and child.state.is_final() and not child.state.is_completed():
                client.set_flow_run_state(child.id, Scheduled(), force=True)
            runs[shard] = child.id
        manifests, failed = {}, []
        try:
            while len(manifests) + len(failed) < len(runs):
                time.sleep(poll_s)
                for shard, run_id in runs.items():
                    child = client.read_flow_run(run_id)
                    if shard not in manifests and shard not in failed and child.state.is_final():
                        if child.state.is_completed():
                            manifests[shard] = ShardManifest.from_json(ShardStore(store).manifest(shard))
                        else:
                            failed.append(shard)
                        progress.ended(shard, manifests.get(shard))
        except (KeyboardInterrupt, TerminationSignal):  # the parent cancelled, stopped or interrupted: so are they
            cancel_runs(client, list(runs.values()))
            raise
    return manifests, failed


def cancel_runs(client, run_ids: list) -> list:
    """Cancel the flow runs of `run_ids` that have not ended (a scheduled one at once, a running one through its
    worker); returns those it cancelled. A parent's cancellation does not reach the runs it started on a pool."""
    cancelled = []
    for run_id in run_ids:
        state = client.read_flow_run(run_id).state
        if state is not None and not state.is_final():
            client.set_flow_run_state(run_id, Cancelled() if state.is_scheduled() else Cancelling(), force=True)
            cancelled.append(run_id)
    return cancelled


class _Progress:
    """The collect-progress artifact (the share of shards collected) and the `shard_listener`, told together."""

    def __init__(self, work: CollectionPlan):
        self.collected, self.total = len(work.done), work.shards
        self.listener = shard_listener.get() or (lambda *event: None)
        self.artifact = create_progress_artifact(100 * self.collected / self.total, key="collect-progress")
        self.listener(self.collected, self.total, None, None)

    def ended(self, shard: int, manifest: ShardManifest | None) -> None:
        self.collected += manifest is not None
        update_progress_artifact(self.artifact, 100 * self.collected / self.total)
        self.listener(self.collected, self.total, shard, manifest)
