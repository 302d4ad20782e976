"""The pipeline: (demo or domain teacher) -> ingest -> collect -> fine-tune -> (collect from the CLLM -> fine-tune it
again) -> evaluate, one profile, one MLflow record.

A stage whose result cannot be trusted stops it in one line before anything downstream starts: a teacher below
its quality floor, a collection of mostly degenerate repetition (cllm_core/runtime/guards.py).

Each stage is its own flow, run here as a subflow with its MLflow run nested under the pipeline's parent
run. Every stage skips what is already done for the same inputs (the cached teacher, verified shards, the
fine-tuned model's fingerprint), so running the pipeline again after a failure continues where it stopped.
"""

from __future__ import annotations

import mlflow
from prefect import flow
from prefect.artifacts import create_link_artifact

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import ModelConfig, Profile, masked
from cllm_core.runtime.guards import BelowQualityFloor, quality_failures
from cllm_core.runtime.records import CllmRecord, headline_metrics
from flows.collect import collect_trajectories
from flows.evaluate import evaluate_speedup
from flows.finetune import consistency_finetune
from flows.ingest import ingest_prompts
from flows.teacher import sft_teacher, train_teacher
from tasks.finetune import promote_cllm
from tasks.tracking import mlflow_run


@flow(name="cllm-pipeline")
def cllm_pipeline(profile: Profile) -> dict:
    """Turn the profile's teacher into a CLLM and measure it; returns the evaluation summary and where it is."""
    if profile.ingest is None or profile.model is None:
        raise UserError("the pipeline needs a profile with `ingest` and a `model` (or a demo `teacher`)")
    params = profile.model_dump(mode="json", exclude={"tracking"})  # a tracking URI may hold credentials
    with mlflow_run(profile.tracking, profile.work_dir, "pipeline", params, resume=True) as run:
        precision = profile.precision
        if profile.teacher is not None:
            train_teacher(profile.teacher, profile.work_dir, profile.tracking, precision)
        if profile.sft is not None:
            sft_teacher(profile.sft, profile.ingest, profile.work_dir, profile.tracking, precision,
                        profile.evaluate.check)
        ingest_prompts(profile.ingest, profile.model, profile.work_dir, profile.tracking)
        collect_trajectories(profile.collect, profile.model, profile.work_dir, tracking=profile.tracking,
                             precision=precision)
        cllm = consistency_finetune(profile.finetune, profile.model, profile.work_dir, tracking=profile.tracking,
                                    precision=precision)
        models = {"teacher": profile.model, "cllm": profile.model.derived(cllm.path)}
        if profile.second_round is not None:
            cllm = second_round(profile, models["cllm"], precision)
            models = {"teacher": profile.model, "cllm-round1": models["cllm"],
                      "cllm": profile.model.derived(cllm.path)}
        result = evaluate_speedup(profile.evaluate, models, profile.work_dir, profile.tracking, precision)
        mlflow.set_tag("cllm.precision", result.precision)
        mlflow.log_metrics(headline_metrics(result.summary))
        floors = profile.evaluate.promote
        failures = quality_failures(result.summary, "cllm", floors)
        promoted = promote_cllm(cllm.logged or {}, floors.alias, failures)
        mlflow.set_tag("cllm.promoted", str(promoted))
        uri = f"{masked(mlflow.get_tracking_uri())} experiment {run.info.experiment_id} run {run.info.run_id}"
        create_link_artifact(key="mlflow-run", link=_run_link(run), description=f"MLflow parent run ({uri})")
        if failures:  # after the evaluation is logged: the run, failed, shows what fell short
            raise BelowQualityFloor(f"the CLLM {cllm.path} is below its quality floors: {'; '.join(failures)}. It is "
                                    f"not given @{floors.alias} (evaluate.promote sets the floors)")
    return {"summary": result.summary, "cllm": cllm.path, "mlflow_run_id": run.info.run_id,
            "registered": cllm.logged, "promoted": promoted}


def second_round(profile: Profile, round1: ModelConfig, precision: str) -> CllmRecord:
    """Jacobi Forcing's second round: the round-1 CLLM's own trajectories (<work_dir>/trajectories-round2), then
    that CLLM fine-tuned on them into <work_dir>/cllm-round2; each stage its own MLflow run (`-round2`)."""
    work_dir, second = profile.work_dir, profile.second_round
    store = str(work_dir / "trajectories-round2")
    collect_trajectories(second.collection(str(work_dir / "trajectories")), round1, work_dir, store=store,
                         tracking=profile.tracking, precision=precision, stage="collect-round2")
    return consistency_finetune(second.finetune, round1, work_dir, store=store, tracking=profile.tracking,
                                precision=precision, out_dir=work_dir / "cllm-round2", stage="finetune-round2")


def _run_link(run) -> str:
    """The run's page in the MLflow UI when the store is a server, else its URI in the local store."""
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
