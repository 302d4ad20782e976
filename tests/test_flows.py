"""The Prefect layer: tasks by `.fn()`, and the ingest and teacher flows run for real (temporary Prefect server,
SQLite MLflow store) through `cllm`, as a user runs them."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import yaml
from prefect.logging import disable_run_logger
from typer.testing import CliRunner

from cllm_core.runtime.config import IngestConfig, ModelConfig
from flows.cli import app
from tasks.ingest import write_prompts
from tests.test_teacher import TINY

pytestmark = pytest.mark.slow  # the Prefect layer (tier c): servers, flows, MLflow stores

runner = CliRunner()


def runs(uri, stage):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["cllm"], filter_string=f"tags.`cllm.stage` = '{stage}'",
                              output_format="list")


def test_write_prompts_task_calls_the_library(tmp_path, tiny_model_dir):
    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps({"q": f"Question {i}?"}) + "\n" for i in range(10)))
    with disable_run_logger():
        manifest = write_prompts.fn(IngestConfig(source=str(source), fields={"question": "q"}),
                                    ModelConfig(name_or_path=str(tiny_model_dir)), tmp_path / "prompts")
    assert manifest["train_rows"] == 9 and (tmp_path / "prompts/eval.parquet").is_file()


def test_cllm_ingest_runs_the_flow_and_records_counts_in_mlflow(prefect_server, tracking, tmp_path, tiny_model_dir):
    source = tmp_path / "tasks.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Do task {i}.", "output": str(i)}) + "\n" for i in range(20)))
    result = runner.invoke(app, ["ingest", str(source), "--field", "question=instruction", "--field", "answer=output",
                                 "--model", str(tiny_model_dir), "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    assert "18 train and 2 eval prompts" in result.output
    (run,) = runs(tracking, "ingest")
    assert run.data.metrics["train_rows"] == 18 and run.data.params["ingest.fields.question"] == "instruction"
    assert run.data.tags["prefect.flow_run_id"]
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "prompts")} >= {
        "prompts/train.parquet", "prompts/eval.parquet", "prompts/manifest.json"}


def test_cllm_ingest_bad_input_inside_the_flow_is_one_line_without_traceback(prefect_server, tracking, tmp_path,
                                                                             tiny_model_dir):
    """Prefect prints a failed run's traceback to the terminal; for bad input `cllm` keeps only the line."""
    source = tmp_path / "tasks.jsonl"
    source.write_text(json.dumps({"text": "hello"}) + "\n")
    env = os.environ | {"PREFECT_API_URL": prefect_server}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(source), "--field", "question=prompt",
                             "--model", str(tiny_model_dir), "--work-dir", str(tmp_path / "work")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"error: field mapping question=prompt: {source} has no column 'prompt' (columns: text)" in output
    assert "Flow run" in output and "Failed" in output  # the run did start and fail inside Prefect
    assert "Traceback" not in output and not (tmp_path / "work/prompts").exists()


def test_cllm_ingest_rejects_bad_options_before_any_flow_runs(tmp_path):
    result = runner.invoke(app, ["ingest", "x.jsonl", "--field", "question", "--model", "m"])
    assert result.exit_code == 1 and "--field expects ROLE=COLUMN" in result.output
    result = runner.invoke(app, ["ingest", "x.jsonl"])
    assert result.exit_code == 1 and "no tokenizer: pass --model" in result.output
    result = runner.invoke(app, ["ingest", "x.jsonl", "--preset", "nope", "--model", "m"])
    assert result.exit_code == 1 and "unknown preset 'nope'" in result.output


def test_cllm_teacher_trains_once_then_reuses_the_cache(prefect_server, tracking, tmp_path):
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump({"teacher": TINY.model_dump()}))
    arguments = ["teacher", "--config", str(profile), "--work-dir", str(tmp_path / "work")]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    assert "(trained)" in first.output and "exact-answer accuracy" in first.output
    second = runner.invoke(app, arguments)
    assert second.exit_code == 0 and "(reused)" in second.output
    trained, reused = sorted(runs(tracking, "teacher"), key=lambda run: run.data.tags["cllm.reused"])
    assert (trained.data.tags["cllm.reused"], reused.data.tags["cllm.reused"]) == ("False", "True")
    assert trained.data.metrics["train_steps"] == TINY.steps and "eval_accuracy" in trained.data.metrics
    assert len(mlflow.MlflowClient().get_metric_history(trained.info.run_id, "train_loss")) >= 1


def test_cllm_teacher_with_sft_fine_tunes_the_base_once_then_reuses_it(prefect_server, tracking, tmp_path,
                                                                       tiny_model_dir):
    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps({"question": f"How many are {i} and {i + 1}?", "answer": "#### 7"}) + "\n"
                              for i in range(24)))
    profile = tmp_path / "domain.yaml"
    profile.write_text(yaml.safe_dump({
        "ingest": {"source": str(source), "template": "plain", "eval_fraction": 0.25, "max_train": 4},
        "sft": {"model": {"name_or_path": str(tiny_model_dir)}, "epochs": 1, "batch_size": 6,
                "eval_max_new_tokens": 4}}))
    arguments = ["teacher", "--config", str(profile), "--work-dir", str(tmp_path / "work")]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    assert "domain teacher" in first.output and "(trained)" in first.output
    assert "fine-tuned on 18 answers, 3 steps" in first.output  # every train answer: ingest.max_train is collection's
    second = runner.invoke(app, arguments)
    assert second.exit_code == 0 and "(reused)" in second.output
    trained, reused = sorted(runs(tracking, "teacher"), key=lambda run: run.data.tags["cllm.reused"])
    assert trained.data.tags["cllm.teacher_base"] == str(tiny_model_dir)
    assert {"eval_accuracy_before", "eval_accuracy", "answers"} <= set(trained.data.metrics)
    assert len(mlflow.MlflowClient().get_metric_history(trained.info.run_id, "train_loss")) >= 1
    teacher = ModelConfig(name_or_path=str(tmp_path / "work/teacher"))
    assert json.loads((tmp_path / "work/teacher/teacher.json").read_text())["fingerprint"] == \
        trained.data.tags["cllm.teacher_fingerprint"]
    from cllm_core import load_model
    assert type(load_model(teacher)).__name__ == "LlamaForCausalLM"
