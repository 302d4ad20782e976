"""Flow of stage 2: teacher + prompts -> `<work_dir>/trajectories/shard-NNNNN.parquet`, resumable.

Shards run one after another per device (`collect.devices`, or the model's device), devices side by side;
a failed shard does not stop the others, and the flow fails at the end naming the shards to retry.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from prefect import allow_failure, flow
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.runtime import flow_run

from cllm_core.config import CollectConfig, ModelConfig, TrackingConfig
from cllm_core.shards import ShardsFailed
from tasks.collect import collect_one_shard, plan_collection
from tasks.tracking import mlflow_run


@flow(name="collect-trajectories")
def collect_trajectories(collect: CollectConfig, model: ModelConfig, work_dir: Path = Path("runs/demo"),
                         store: str | None = None, tracking: TrackingConfig = TrackingConfig()) -> dict:
    """Collect every shard of `<work_dir>/prompts/train.parquet` not already done in the store."""
    prompts, store = work_dir / "prompts" / "train.parquet", store or str(work_dir / "trajectories")
    with mlflow_run(tracking, work_dir, "collect", {"collect": collect.model_dump(), "model": model.model_dump(),
                                                    "store": store}):
        work = plan_collection(collect, model, prompts, store)
        progress = create_progress_artifact(100 * len(work["done"]) / work["shards"], key="collect-progress")
        devices = collect.devices or [model.device]
        last, futures = {}, {}
        for i, shard in enumerate(work["todo"]):  # one chain of shards per device
            device = devices[i % len(devices)]
            futures[shard] = collect_one_shard.submit(
                collect, model.model_copy(update={"device": device}), prompts, store, shard, work["record"],
                wait_for=[allow_failure(last[device])] if device in last else None)
            last[device] = futures[shard]
        manifests, failed = {}, []
        for shard, future in futures.items():
            future.wait()
            if future.state.is_completed():
                manifests[shard] = future.result()
            else:
                failed.append(shard)
            update_progress_artifact(progress, 100 * (len(work["done"]) + len(manifests)) / work["shards"])
        summary = {"shards": work["shards"], "shards_skipped": len(work["done"]),
                   "shards_collected": len(manifests), "shards_failed": len(failed)}
        if manifests:
            rows = list(manifests.values())
            seconds = sum(m["seconds"] for m in rows)
            summary |= {"prompts_per_s": sum(m["rows"] for m in rows) / seconds,
                        "tokens_per_s": sum(m["tokens"] for m in rows) / seconds,
                        "repetitive": sum(m["repetitive"] for m in rows),
                        "mean_passes_per_block": sum(m["mean_passes_per_block"] * m["rows"] for m in rows)
                        / sum(m["rows"] for m in rows)}
            create_table_artifact(key="collect-shards", table=[
                {key: m[key] for key in ("shard", "rows", "tokens", "seconds", "prompts_per_s",
                                         "mean_passes_per_block", "repetitive")} for m in rows])
        mlflow.log_metrics(summary)
        mlflow.log_input(MetaDataset(LocalArtifactDatasetSource(store), name="jacobi-trajectories",
                                     digest=work["record"]["config_hash"][:8]), context="collect")
        if failed:
            raise ShardsFailed(f"shards {failed} failed; run `prefect flow-run retry {flow_run.id}` or the same "
                               "command again: finished shards are skipped")
    return summary | {"store": store, "config_hash": work["record"]["config_hash"]}
