"""The deployment path, for real: the session's Prefect server on 127.0.0.1 (a server of its own would cost
another 20 s), a process work pool, `prefect deploy` from prefect.yaml, a worker, and the tiny pipeline run as
the `cllm-pipeline/local` deployment to completion; then everything started here is stopped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow  # the Prefect layer (tier c): servers, flows, MLflow stores

ROOT = Path(__file__).parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def test_the_pipeline_deployment_runs_on_a_process_worker_of_a_real_server(prefect_server, tracking, tmp_path,
                                                                          tiny_pipeline_profile):
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": prefect_server,
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_PROMPT": "false",
                        "MLFLOW_TRACKING_URI": tracking, "PWD": str(ROOT)}
    started = []

    def run(*args, timeout=180):
        done = subprocess.run([*PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout

    try:
        run("work-pool", "create", "local-pool", "--type", "process")
        assert "cllm-pipeline/local" in run("--no-prompt", "deploy", "--name", "local")
        started.append(subprocess.Popen([*PREFECT, "worker", "start", "--pool", "local-pool", "--limit", "1"],
                                        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        params = json.dumps({"profile": tiny_pipeline_profile})
        output = run("deployment", "run", "cllm-pipeline/local", "--params", params, "--watch",
                     "--watch-timeout", "400", timeout=450)
        assert "Completed" in output, output[-2000:]
    finally:
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert all(process.poll() is not None for process in started)

    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["cllm"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags["cllm.stage"] == "pipeline"]
    stages = {r.data.tags["cllm.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert stages == {"ingest", "collect", "finetune", "evaluate"}
    assert Path(tiny_pipeline_profile["work_dir"], "cllm", "cllm.json").is_file()
