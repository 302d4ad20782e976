"""Flow of stage 4: {teacher, CLLM} x {AR, Jacobi, prompt lookup} on `<work_dir>/prompts/eval.parquet`.

Metrics land in MLflow under stable names (`{model}.{method}.tokens_per_forward`, `.speedup`, `.accuracy` ...),
with the summary as an MLflow table, the per-sample Parquet and the pictures as artifacts, and the summary as
a Prefect markdown artifact.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from cllm_core.evaluation.report import markdown_table
from cllm_core.runtime.config import EvalConfig, ModelConfig, Precision, TrackingConfig
from cllm_core.runtime.records import Evaluation, headline_metrics
from tasks.evaluate import evaluate_models
from tasks.tracking import mlflow_run


@flow(name="evaluate-speedup")
def evaluate_speedup(evaluate: EvalConfig, models: dict[str, ModelConfig], work_dir: Path = Path("runs/demo"),
                     tracking: TrackingConfig = TrackingConfig(), precision: Precision = "auto") -> Evaluation:
    """Decode the eval prompts with every model and method, interleaved; the first model is the baseline."""
    out_dir = work_dir / "eval"
    with mlflow_run(tracking, work_dir, "evaluate", {"evaluate": evaluate.model_dump(),
                                                     "models": {k: v.model_dump() for k, v in models.items()},
                                                     "precision": precision}):
        result = evaluate_models(evaluate, models, work_dir / "prompts" / "eval.parquet", out_dir, precision)
        mlflow.set_tag("cllm.precision", result.precision)
        mlflow.log_param("n_tokens", result.jacobi["n_tokens"])  # the block size decoded at, as trained or set
        summary = [row.to_json() for row in result.summary]
        mlflow.log_metrics(headline_metrics(result.summary))
        mlflow.log_table({key: [row[key] for row in summary] for key in summary[0]}, "summary.json")
        mlflow.log_artifact(result.samples)
        for picture in result.pictures:
            mlflow.log_artifact(picture, "pictures")
    create_markdown_artifact(key="evaluation", markdown=f"**Evaluation** on {result.prompts} prompts, "
                             f"speedups vs {' '.join(result.baseline)}\n\n{markdown_table(result.summary)}")
    return result
