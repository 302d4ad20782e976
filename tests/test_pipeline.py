"""The whole pipeline on a tiny profile under Prefect's test harness, read back from MLflow: one parent run,
a child run per stage, the headline metrics, the registered CLLM; bad config, a failing quality floor and a
repetitive collection stop it in one line. (A rerun reusing each stage's work is tested stage by stage.)"""

import os

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.slow  # the Prefect layer (tier c): servers, flows, MLflow stores

runner = CliRunner()


@pytest.fixture
def tiny_profile(tmp_path, tiny_pipeline_profile, tracking):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline_profile))
    return path


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "collect.n_tokenz=4"], "collect.n_tokenz: Extra inputs are not permitted"),
    (["--set", "finetune.steps=many"], "finetune.steps: Input should be a valid integer"),
    (["--set", "evaluate.jacobi.n_tokens=64"], "n_tokens (64) is larger than max_new_tokens (12)"),
    (["--set", "oops"], "--set expects SECTION.FIELD=VALUE"),
    (["--set", "tracking.uri=http://127.0.0.1:9"], "the MLflow tracking server http://127.0.0.1:9 does not answer"),
    (["--set", "tracking.uri=http://me:pw@127.0.0.1:9"], "uri carries credentials; keep them out of profiles"),
    (["--set", "tracking.uri=postgresql://me:pw@db/mlflow"], "(got {'uri': 'postgresql://***@db/mlflow'})"),
])
def test_a_bad_config_is_one_line_before_any_work(tiny_profile, args, expected):
    result = runner.invoke(app, ["run", "--config", str(tiny_profile), *args])
    assert result.exit_code == 1 and expected in result.output and "me:pw" not in result.output
    assert not (tiny_profile.parent / "work").exists()


def test_a_token_written_into_the_tracking_uri_is_refused_without_showing_it(tiny_profile, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://tkn-0123456789@127.0.0.1:9")
    result = runner.invoke(app, ["run", "--config", str(tiny_profile)])
    assert result.exit_code == 1 and "carries a user name but no password; put a token in MLFLOW_TRACKING_TOKEN" \
        in result.output and "tkn-0123456789" not in result.output


PASSWORD = "s3cr3t-pw-0123"


@pytest.fixture(scope="module", autouse=True)
def auth_server(tmp_path_factory):
    """An MLflow server with basic auth, started with the module so that it boots (about 20 s on 2 cores) while
    the tests before the one that uses it run; stopped with the module. Yields its URL."""
    import subprocess
    import sys

    from tests.servers import free_port

    directory = tmp_path_factory.mktemp("mlflow-server")
    (directory / "auth.ini").write_text("[mlflow]\ndefault_permission = READ\nadmin_username = admin\n"
                                        f"database_uri = sqlite:///{directory / 'auth.db'}\n"
                                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                                        "auth_cache_ttl_seconds = 300\n")  # as README advises: 0.25 s a request without
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri",
                               f"sqlite:///{directory / 'server.db'}", "--artifacts-destination",
                               str(directory / "server-artifacts")], cwd=directory, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
                                                              "MLFLOW_AUTH_CONFIG_PATH": str(directory / "auth.ini"),
                                                              "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_pipeline_records_a_run_per_stage_into_a_real_mlflow_server_with_credentials_never_shown(
        prefect_server, auth_server, tiny_profile, monkeypatch):
    """A server with basic auth, the credentials in $MLFLOW_TRACKING_URI: one parent run with a child per stage
    and the registered CLLM, read back over HTTP, and the password appears in no output, MLflow param or tag, or
    Prefect artifact."""
    from prefect.client.orchestration import get_client

    from benchmarks.pipeline import read_all
    from tests.servers import wait_healthy

    password, token, uri = PASSWORD, "hf_s3cr3tT0ken", auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{password}@{uri.removeprefix('http://')}")
    monkeypatch.setenv("HF_TOKEN", token)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # the run sets them from the URI
    try:
        wait_healthy(f"{uri}/health")
        result = runner.invoke(app, ["run", "--config", str(tiny_profile), "--set", "finetune.lr=1e-3"])
        assert result.exit_code == 0, result.output
        assert f"in {uri}. The MLflow UI: open {uri}" in result.output and "| cllm | jacobi |" in result.output

        client = mlflow.MlflowClient(tracking_uri=uri)  # the credentials reach it from the environment
        experiment = client.get_experiment_by_name("cllm")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if r.data.tags["cllm.stage"] == "pipeline"]
        children = {r.data.tags["cllm.stage"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == {"ingest", "collect", "finetune", "evaluate"}
        assert parent.data.params["finetune.lr"] == "0.001" and "tracking.uri" not in parent.data.params
        assert parent.data.metrics["teacher.ar.speedup"] == 1.0
        assert "cllm.jacobi.tokens_per_forward" in parent.data.metrics
        (version,) = client.search_model_versions("name = 'cllm'")
        assert version.run_id == children["finetune"].info.run_id
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's store, not a local path
        assert client.get_model_version_by_alias("cllm", "champion").version == version.version  # it passed
        rerun = runner.invoke(app, ["run", "--config", str(tiny_profile), "--set", "finetune.lr=1e-3"])
        assert rerun.exit_code == 0, rerun.output
        reused = [r for r in client.search_runs([experiment.experiment_id])
                  if r.data.tags["cllm.stage"] == "finetune" and r.data.tags.get("cllm.reused") == "True"]
        assert len(reused) == 1 and reused[0].data.tags["cllm.registered_version"] == version.version
        assert len(client.search_model_versions("name = 'cllm'")) == 1  # a reused CLLM is no new version (#32.8)

        with get_client(sync_client=True) as prefect:
            artifacts = [f"{a.data} {a.description}" for a in read_all(prefect.read_artifacts)]
            logs = [log.message for log in read_all(prefect.read_logs)]
            parameters = [str(run.parameters) for run in read_all(prefect.read_flow_runs)]
        assert any(f"{uri}/#/experiments/" in text for text in artifacts) and len(logs) > 20
        recorded = [*artifacts, *logs, *parameters, result.output,
                    *(str(r.data.params) + str(r.data.tags) for r in runs)]
        assert not [text for text in recorded if password in text or token in text]
    finally:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)  # moved there from the URI by the run


def test_a_teacher_below_its_quality_floor_stops_the_pipeline_in_one_line(prefect_server, tmp_path, tracking):
    profile = tmp_path / "floor.yaml"
    profile.write_text(yaml.safe_dump({
        "work_dir": str(tmp_path / "work"), "precision": "fp32",
        "teacher": {"train_problems": 400, "eval_problems": 20, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                    "intermediate_size": 64, "steps": 4, "batch_size": 8, "warmup_steps": 2, "min_accuracy": 0.95},
        "ingest": {"source": "synthetic-math", "max_train": 20, "max_eval": 4}}))
    result = runner.invoke(app, ["run", "--config", str(profile)])
    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]  # one line, no traceback
    assert line.startswith("error: the demo teacher reached") and "below teacher.min_accuracy 95%" in line
    assert not [p.name for p in (tmp_path / "work").glob("*") if not p.name.startswith(".")]  # no teacher, prompts
    (failed,) = mlflow.search_runs(experiment_names=["cllm"], filter_string="tags.`cllm.stage` = 'pipeline'",
                                   output_format="list")
    assert failed.info.status == "FAILED"


def test_a_mostly_repetitive_collection_stops_the_pipeline_before_fine_tuning(prefect_server, tiny_profile,
                                                                             monkeypatch):
    import cllm_core.data.trajectories

    monkeypatch.setattr(cllm_core.data.trajectories, "repetitive", lambda response: True)  # a teacher that only repeats
    result = runner.invoke(app, ["run", "--config", str(tiny_profile)])
    assert result.exit_code == 1, result.output
    assert "\nerror: 9 of 9 collected responses (100%) are degenerate repetition, above collect.max_repetitive " \
           "50%" in result.output
    work = tiny_profile.parent / "work"
    assert (work / "trajectories").is_dir() and not (work / "cllm").exists() and not (work / "eval").exists()


def test_a_cllm_below_a_quality_floor_stays_a_candidate_without_the_alias_and_the_run_fails_in_one_line(
        prefect_server, tiny_profile, tracking):
    """A collapsed CLLM was registered and `cllm run` exited 0 (#32.8): users loading the registry got it."""
    result = runner.invoke(app, ["run", "--config", str(tiny_profile), "--set", "evaluate.promote.min_speedup=1000"])
    assert result.exit_code == 1, result.output
    assert "error: the CLLM " in result.output and "is below its quality floors: cllm jacobi runs at " \
        in result.output and "below evaluate.promote.min_speedup 1000x. It is not given @champion" in result.output
    client = mlflow.MlflowClient(tracking)
    (version,) = client.search_model_versions("name = 'cllm'")
    assert version.tags["cllm.promotion"].startswith("candidate: cllm jacobi runs at ")
    assert not client.get_registered_model("cllm").aliases


def test_a_collection_that_keeps_no_prompt_stops_the_pipeline_in_one_line_naming_the_remedy(prefect_server,
                                                                                           tiny_profile):
    """It once went on to fail in training with `trajectories mixes block sizes []`. The tiny random teacher never
    emits its EOS, so `finished_only` leaves every prompt out."""
    result = runner.invoke(app, ["run", "--config", str(tiny_profile), "--set", "collect.finished_only=true"])
    assert result.exit_code == 1, result.output
    assert "\nerror: the collection holds no trajectory: collect.finished_only left out all 9 prompts, none of " \
           "whose greedy responses ended within max_new_tokens" in result.output
    work = tiny_profile.parent / "work"
    assert (work / "trajectories").is_dir() and not (work / "cllm").exists()


def test_a_second_round_collects_from_the_cllm_and_trains_it_again_with_records_of_its_own(
        prefect_server, tmp_path, tiny_pipeline_profile, tracking):
    import json

    profile = tmp_path / "two-rounds.yaml"
    model = tiny_pipeline_profile["model"] | {"attn_implementation": "sdpa"}  # what the CLLM must keep (#32.1)
    profile.write_text(yaml.safe_dump(tiny_pipeline_profile | {"model": model, "precision": "fp32", "second_round": {
        "collect": {"jacobi": {"n_tokens": 6}}, "finetune": {"steps": 2, "objective": "jacobi_forcing"}}}))
    result = runner.invoke(app, ["run", "--config", str(profile)])
    assert result.exit_code == 0, result.output

    work = tmp_path / "work"
    second = json.loads((work / "cllm-round2/cllm.json").read_text())
    assert second["teacher"]["name_or_path"] == str(work / "cllm")  # round 2 starts from round 1's CLLM
    assert second["teacher"]["attn_implementation"] == "sdpa"  # on the teacher's device, with its kernel
    assert second["trajectories"]["store"] == str(work / "trajectories-round2") and second["n_tokens"] == 6
    assert second["config"]["objective"] == "jacobi_forcing" and second["config"]["steps"] == 2
    assert second["config"]["batch_size"] == 4  # what the profile's round 1 says, where round 2 is silent
    collected = json.loads((work / "trajectories-round2/collection.json").read_text())
    assert collected["config"]["n_tokens"] == 6
    first = json.loads((work / "trajectories/collection.json").read_text())  # round 2 keeps the teacher's fixed points
    assert collected["reference"]["config_hash"] == first["config_hash"]
    manifests = [json.loads(path.read_text()) for path in sorted((work / "trajectories-round2").glob("shard-*.json"))]
    assert sum(m["rows"] + m["departed"] for m in manifests) == 9  # every training prompt: kept or departed

    runs = mlflow.search_runs(experiment_names=["cllm"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags["cllm.stage"] == "pipeline"]
    stages = {r.data.tags["cllm.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert stages == {"ingest", "collect", "finetune", "collect-round2", "finetune-round2", "evaluate"}
    for model in ("teacher", "cllm-round1", "cllm"):  # the final CLLM keeps the headline names
        assert parent.data.metrics[f"{model}.jacobi.exact_match"] == 1.0
    versions = mlflow.MlflowClient().search_model_versions("name = 'cllm'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
