"""Prefect tasks of stage 2: plan the collection, collect one shard.

Resume rests on the shard manifests, not on Prefect's result cache: a cache hit cannot see that a shard file
was deleted or altered since, a manifest check can. So a new run and `prefect flow-run retry` both redo
exactly the shards that are not verifiably done.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from cllm_core.data.collect import collect_shard, plan
from cllm_core.data.shards import ShardStore
from cllm_core.runtime.config import CollectConfig, ModelConfig
from cllm_core.runtime.records import CollectionPlan, ShardManifest


@task(name="plan-collection")
def plan_collection(config: CollectConfig, model: ModelConfig, prompts: Path, store: str,
                    precision: str = "auto") -> CollectionPlan:
    """Pin the store to this collection (the precision resolved here); returns the record and the shards done and
    to do."""
    work = plan(config, model, prompts, store, precision)
    get_run_logger().info("%d prompts in %d shards: %d done, %d to collect", work.prompts, work.shards,
                          len(work.done), len(work.todo))
    return work


def _transient(task, task_run, state) -> bool:
    """Retry what may pass next time (I/O, CUDA, a lost node), not bad input."""
    return not isinstance(state.result(raise_on_failure=False), ValueError)


@task(name="collect-shard", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      task_run_name="collect-shard-{shard}")
def collect_one_shard(config: CollectConfig, model: ModelConfig, prompts: Path, store: str, shard: int,
                      record: dict) -> ShardManifest:
    """Collect and publish one shard; returns its manifest. `record`: the plan's collection record."""
    return collect_shard(config, model, prompts, ShardStore(store), shard, record, log=get_run_logger().info)
