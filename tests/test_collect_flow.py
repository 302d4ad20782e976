"""Stage 2 as users run it: `cllm collect` under Prefect, a failing shard, and kill -9 then resume."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from io import StringIO

import mlflow
import prefect_dask
import pytest
from rich.console import Console
from typer.testing import CliRunner

import tasks.collect
from cllm_core.data.collect import collect
from cllm_core.data.ingest import ingest
from cllm_core.data.shards import ShardStore
from cllm_core.runtime.config import CollectConfig, IngestConfig, ModelConfig
from cllm_core.runtime.records import ShardManifest
from flows.cli import app, live_progress
from flows.cli.signals import STOP_GRACE_S
from flows.collect import shard_listener

pytestmark = pytest.mark.slow  # the Prefect layer (tier c): servers, flows, MLflow stores

runner = CliRunner()


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory, tiny_model_dir):
    """A work dir whose prompts/ came from stage 1: 36 train prompts."""
    directory = tmp_path_factory.mktemp("work")
    source = directory / "q.jsonl"
    source.write_text("".join(json.dumps({"question": f"Tell me about the number {i} please."}) + "\n"
                              for i in range(40)))
    ingest(IngestConfig(source=str(source), template="plain"), ModelConfig(name_or_path=str(tiny_model_dir)),
           directory / "prompts", log=lambda line: None)
    return directory


@pytest.fixture
def fresh(work_dir, tmp_path, tracking):
    """A copy of the work dir with its own MLflow store."""
    copy = tmp_path / "work"
    shutil.copytree(work_dir / "prompts", copy / "prompts")
    return copy


def options(model, work):
    return ["collect", "--model", str(model), "--work-dir", str(work), "--n-tokens", "4", "--max-new-tokens", "12",
            "--shard-size", "8", "--batch-size", "4", "--precision", "fp32"]


def test_a_failing_shard_does_not_stop_the_others_and_a_rerun_collects_only_it(prefect_server, fresh, tiny_model_dir,
                                                                              monkeypatch):
    real = tasks.collect.collect_shard

    def shard_two_breaks(config, model, prompts, store, shard, record, log):
        if shard == 2:
            raise ValueError("shard 2 hit bad data")
        return real(config, model, prompts, store, shard, record, log)

    heard = []
    token = shard_listener.set(lambda *event: heard.append(event))  # not a terminal: the CLI keeps it
    monkeypatch.setattr(tasks.collect, "collect_shard", shard_two_breaks)
    first = runner.invoke(app, options(tiny_model_dir, fresh))
    assert first.exit_code == 1 and "shards [2] failed" in first.output
    # this run has no deployment: the retry it suggests must name the code (it once left --entrypoint out)
    assert "--entrypoint flows/collect.py:collect_trajectories` or the same command again" in first.output
    assert [(collected, total, shard, manifest and manifest.shard) for collected, total, shard, manifest
            in heard] == [(0, 5, None, None), (1, 5, 0, 0), (2, 5, 1, 1), (2, 5, 2, None), (3, 5, 3, 3),
                          (4, 5, 4, 4)]
    shard_listener.reset(token)
    store = ShardStore(str(fresh / "trajectories"))
    assert sorted(p.name for p in (fresh / "trajectories").glob("shard-*.json")) == [
        f"shard-0000{i}.json" for i in (0, 1, 3, 4)]
    monkeypatch.setattr(tasks.collect, "collect_shard", real)
    second = runner.invoke(app, options(tiny_model_dir, fresh))
    assert second.exit_code == 0, second.output
    assert "5 shards in" in second.output and "1 collected, 4 already done" in second.output
    assert store.read(list(range(5))).num_rows == 36
    run = mlflow.search_runs(experiment_names=["cllm"], filter_string="attributes.status = 'FINISHED'",
                             output_format="list")[0]
    assert run.data.metrics["shards_collected"] == 1 and run.data.metrics["shards_skipped"] == 4
    assert run.inputs.dataset_inputs[0].dataset.name == "jacobi-trajectories"


def test_kill_9_mid_collection_then_rerun_equals_an_uninterrupted_collection(prefect_server, fresh, tiny_model_dir,
                                                                            tmp_path):
    command = [sys.executable, "-m", "flows.cli", *options(tiny_model_dir, fresh)[:-6], "--shard-size", "2",
               "--batch-size", "1", "--limit", "16", "--precision", "fp32"]
    env = os.environ | {"PREFECT_API_URL": prefect_server}  # the CLI's own server start is the SIGTERM test's
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    store = fresh / "trajectories"
    deadline = time.monotonic() + 240
    while not list(store.glob("shard-*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = len(list(store.glob("shard-*.json")))
    assert 1 <= done_at_kill < 8  # it died mid-way

    resumed = runner.invoke(app, command[3:])  # the same command, in this process (a second start costs 10 s)
    assert resumed.exit_code == 0, resumed.output
    assert f"{done_at_kill} already done" in resumed.output.replace("\n", " ")
    config = CollectConfig(jacobi={"n_tokens": 4, "max_new_tokens": 12}, shard_size=2, batch_size=1, limit=16)
    collect(config, ModelConfig(name_or_path=str(tiny_model_dir)), fresh / "prompts/train.parquet",
            str(tmp_path / "uninterrupted"), log=lambda line: None)
    shards = list(range(8))
    resumed_rows = ShardStore(str(store)).read(shards).sort_by("prompt_id").to_pylist()
    clean_rows = ShardStore(str(tmp_path / "uninterrupted")).read(shards).sort_by("prompt_id").to_pylist()
    assert len({r["prompt_id"] for r in resumed_rows}) == len(resumed_rows) == 16
    assert resumed_rows == clean_rows



@pytest.mark.slow
def test_sigterm_mid_shard_stops_it_unpublished_in_one_line_and_a_rerun_equals_an_uninterrupted_collection(
        fresh, tiny_model_dir, tmp_path):
    """SIGTERM once left `cllm collect` waiting for the running shard to finish (#14): the shard now stops at its
    next Jacobi pass, unpublished. Run as users run it, with no Prefect settings: its server lives in the work dir."""
    command = [sys.executable, "-m", "flows.cli", *options(tiny_model_dir, fresh)[:-6], "--max-new-tokens", "48",
               "--shard-size", "4", "--batch-size", "1", "--limit", "8", "--precision", "fp32"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env[STOP_GRACE_S] = "60"  # a stop that hangs ends with every thread's stack, before this test gives up
    store, log = fresh / "trajectories", tmp_path / "first.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (store / "shard-00000.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)  # shard 1 (4 prompts, one at a time) has just begun
        asked = time.monotonic()
        process.wait(timeout=120)
    print(f"exited {time.monotonic() - asked:.1f} s after SIGTERM")
    output = log.read_text()
    assert process.returncode == 130, output[-3000:]
    assert "stopped at your request; run the same command again to resume" in output and "Traceback" not in output
    assert "still running" not in output  # it ended by itself, not by the deadline
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("shard-")) == [
        "shard-00000.json", "shard-00000.parquet"]  # shard 1 was not finished and published first
    assert {"prefect.db", "server.log"} <= {p.name for p in (fresh / ".prefect").iterdir()}  # the CLI's own server

    config, lines = CollectConfig(jacobi={"n_tokens": 4, "max_new_tokens": 48}, shard_size=4, batch_size=1, limit=8), []
    teacher = ModelConfig(name_or_path=str(tiny_model_dir))
    collect(config, teacher, fresh / "prompts/train.parquet", str(store), log=lines.append)  # the same collection
    assert lines[0] == "shard 0: done, skipped" and lines[1].startswith("shard 1: 4 prompts")
    collect(config, teacher, fresh / "prompts/train.parquet", str(tmp_path / "uninterrupted"), log=lambda line: None)
    resumed = ShardStore(str(store)).read([0, 1]).to_pylist()
    assert len(resumed) == 8 and resumed == ShardStore(str(tmp_path / "uninterrupted")).read([0, 1]).to_pylist()


def test_the_bars_show_shards_and_training_steps_and_are_off_without_a_terminal(monkeypatch):
    from tasks.progress import step_listener

    screen = Console(file=StringIO(), force_terminal=True, width=220)
    monkeypatch.setattr("flows.cli.progress.console", screen)
    monkeypatch.setattr("flows.cli.startup.prefect_console_handlers", lambda: [])
    manifest = ShardManifest(shard=1, rows=4, bytes=1, sha256="", config_hash="", teacher="", schema_version=1,
                             seconds=0.3, prompts_per_s=12.5, tokens_per_s=300.0, tokens=90, forwards=40,
                             mean_passes_per_block=2.25, repetitive=0)
    with live_progress(True):
        shard_listener.get()(1, 3, None, None)
        shard_listener.get()(2, 3, 1, manifest)
        shard_listener.get()(2, 3, 2, None)
        step_listener.get()("fine-tuning", 40, 600, {"loss": 10.75, "tokens_per_s": 6500.0})
    shown = screen.file.getvalue()
    assert "2/3" in shown and "shard 1: 12.50 prompts/s, 300 tokens/s, 2.25 passes per block" in shown
    assert "failed: [2]" in shown and shard_listener.get() is None and step_listener.get() is None
    assert "fine-tuning" in shown and "40/600" in shown and "loss 10.750, 6500 tokens/s" in shown
    for enabled, terminal in ((False, True), (True, False)):
        screen = Console(file=StringIO(), force_terminal=terminal)
        monkeypatch.setattr("flows.cli.progress.console", screen)
        with live_progress(enabled):
            assert shard_listener.get() is None and step_listener.get() is None
        assert screen.file.getvalue() == ""


def test_the_dask_runner_collects_the_same_rows_as_the_library_in_dask_workers(prefect_server, fresh, tiny_model_dir,
                                                                                tmp_path, monkeypatch):
    submitted = []
    real_submit = prefect_dask.DaskTaskRunner.submit
    monkeypatch.setattr(prefect_dask.DaskTaskRunner, "submit",
                        lambda self, task, *args, **kwargs: submitted.append(task.name) or
                        real_submit(self, task, *args, **kwargs))
    result = runner.invoke(app, [*options(tiny_model_dir, fresh), "--task-runner", "dask"])
    assert result.exit_code == 0, result.output
    assert "5 shards in" in result.output and "5 collected" in result.output
    assert submitted == ["collect-shard"] * 5
    config = CollectConfig(jacobi={"n_tokens": 4, "max_new_tokens": 12}, shard_size=8, batch_size=4)
    collect(config, ModelConfig(name_or_path=str(tiny_model_dir)), fresh / "prompts/train.parquet",
            str(tmp_path / "library"), log=lambda line: None)
    shards = list(range(5))
    assert ShardStore(str(fresh / "trajectories")).read(shards).to_pylist() == \
        ShardStore(str(tmp_path / "library")).read(shards).to_pylist()


def test_the_dask_runner_without_the_extra_is_one_line(fresh, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # what an install without the extra sees
    result = runner.invoke(app, [*options(tiny_model_dir, fresh), "--task-runner", "dask"])
    assert result.exit_code == 1
    assert "error: the dask task runner needs the dask extra: pip install 'cllm-pipeline[dask]'" in result.output


def test_a_stop_request_reaches_the_dask_workers_through_their_stop_file(tmp_path, prefect_server, tiny_model_dir):
    """Dask workers are processes of their own: a stop request set a flag only the parent saw, so their shards
    decoded on to the end."""
    import subprocess

    from cllm_core.engine.stopping import STOP_FILE, clear_stop, request_stop
    from flows.collect import task_runner

    runner_ = task_runner("dask", CollectConfig(jacobi={"n_tokens": 4}), ModelConfig(name_or_path=str(tiny_model_dir)))
    stop_file = runner_.cluster_kwargs["env"][STOP_FILE]
    worker = subprocess.Popen([sys.executable, "-c", "import time\nfrom cllm_core.engine.stopping import Stopped, "
                               "raise_if_stopped\nprint('up', flush=True)\ntry:\n    while True:\n"
                               "        raise_if_stopped(); time.sleep(0.05)\nexcept Stopped:\n    print('stopped')"],
                              env=os.environ | {STOP_FILE: stop_file}, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "up"
        request_stop()  # here, in the parent
        assert worker.wait(timeout=30) == 0 and worker.stdout.read().strip() == "stopped"
    finally:
        clear_stop()
        worker.kill()


def test_a_cancelled_parent_cancels_the_shard_runs_it_started_on_the_pool(prefect_server):
    """Cancelling a collection that runs its shards as deployment runs left them running on the pool."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running, Scheduled

    from flows.collect import cancel_runs

    @flow(name="shard-stand-in")
    def stand_in():
        pass

    with get_client(sync_client=True) as client:
        runs = [client.create_flow_run(stand_in, state=state).id for state in (Scheduled(), Running(), Completed())]
        assert cancel_runs(client, runs) == runs[:2]  # the ended one is left as it is
        states = [client.read_flow_run(run).state for run in runs]
    assert states[0].is_cancelled() and states[1].name == "Cancelling" and states[2].is_completed()
