"""`cllm train` through Prefect (temporary server) into a SQLite MLflow store: the run holds the loss curve per
step, the Jacobi samples, the trajectories as its dataset input, and the registered CLLM."""

import json
import shutil

import mlflow
import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.slow  # the Prefect layer (tier c): servers, flows, MLflow stores

runner = CliRunner()


@pytest.fixture
def work(tmp_path, tiny_trajectories, tracking):
    """A work dir as the earlier stages leave it: prompts and trajectories (of the tiny teacher)."""
    shutil.copytree(tiny_trajectories / "prompts", tmp_path / "work/prompts")
    shutil.copytree(tiny_trajectories / "store", tmp_path / "work/trajectories")
    return tmp_path / "work"


def test_cllm_train_streams_the_curve_and_registers_the_model(prefect_server, work, tiny_model_dir):
    args = ["train", "--model", str(tiny_model_dir), "--work-dir", str(work), "--steps", "6", "--batch-size", "4",
            "--ar-weight", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "CLLM" in result.output and "(trained)" in result.output and "registered as cllm v1" in result.output
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["cllm"], filter_string="tags.`cllm.stage` = 'finetune'",
                                output_format="list")
    assert run.data.params["finetune.ar_weight"] == "1.0" and run.data.params["n_tokens"] == "4"
    assert run.data.tags["prefect.flow_run_id"] and run.data.tags["cllm.reused"] == "False"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [6]
    assert {"lr", "grad_norm", "tokens_per_s", "consistency", "ar", "agreement", "sample_tokens_per_forward",
            "train_seconds"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step-000006.txt"]
    assert run.inputs.dataset_inputs[0].dataset.name == "jacobi-trajectories"
    (version,) = client.search_model_versions("name = 'cllm'")
    assert version.run_id == run.info.run_id

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "(reused)" in again.output, again.output


def test_cllm_train_over_two_processes_is_one_flow_run_one_mlflow_run_and_the_one_process_record(
        prefect_server, work, tiny_model_dir):
    """`--processes 2`: the task launches 2 gloo processes with `accelerate launch`; the losses they agree on
    stream into the stage's one MLflow run, and equal one process's on the same samples (batch 2 x 2 = 4)."""
    args = ["train", "--model", str(tiny_model_dir), "--work-dir", str(work), "--steps", "4", "--ar-weight", "1",
            "--log-every", "1", "--warmup-steps", "0", "--sample-prompts", "0",
            "--precision", "fp32"]  # bf16 sums in another order differ by ~1e-3
    launched = runner.invoke(app, [*args, "--processes", "2", "--batch-size", "2"])
    assert launched.exit_code == 0, launched.output
    (run,) = mlflow.search_runs(experiment_names=["cllm"], filter_string="tags.`cllm.stage` = 'finetune'",
                                output_format="list")
    assert run.data.params["finetune.launch.processes"] == "2"
    streamed = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")]
    alone = runner.invoke(app, [*args, "--batch-size", "4"])  # another fingerprint: trained again, in place
    assert alone.exit_code == 0 and "(trained)" in alone.output, alone.output
    single = json.loads((work / "cllm" / "cllm.json").read_text())
    assert len(streamed) == 4 and streamed == pytest.approx([h["loss"] for h in single["history"]], rel=1e-4)


def test_cllm_eval_records_stable_metric_names_the_table_and_pictures(prefect_server, work, tiny_model_dir):
    result = runner.invoke(app, ["eval", "--model", f"teacher={tiny_model_dir}", "--model", f"copy={tiny_model_dir}",
                                 "--work-dir", str(work), "--limit", "3", "--n-tokens", "4", "--max-new-tokens", "12",
                                 "--method", "ar", "--method", "jacobi", "--precision", "fp32"])
    assert result.exit_code == 0, result.output  # fp32: Jacobi equals greedy bit for bit (bf16 near-ties may flip)
    assert "| copy | jacobi |" in result.output and "3 prompts" in result.output
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["cllm"], filter_string="tags.`cllm.stage` = 'evaluate'",
                                output_format="list")
    metrics = run.data.metrics
    assert metrics["teacher.ar.speedup"] == 1.0 and metrics["copy.jacobi.exact_match"] == 1.0
    assert metrics["copy.ar.accuracy"] == metrics["teacher.ar.accuracy"]  # the same weights answer alike
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "samples.parquet",
                                                                       "pictures"}
    assert len(client.list_artifacts(run.info.run_id, "pictures")) == 5  # 3 summaries + 2 trajectories

    compared = runner.invoke(app, ["compare", run.info.run_id, run.info.run_id, "--work-dir", str(work)])
    assert compared.exit_code == 0 and "copy.jacobi.tokens_per_forward" in compared.output, compared.output
