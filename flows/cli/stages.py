"""The stage commands: each runs its flow on the profile, options and `--set` applied, and prints one summary."""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal

import typer

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import ModelConfig, Profile, TeacherConfig, masked
from flows.cli.base import command, console
from flows.cli.progress import live_progress
from flows.cli.startup import announce_precision, start_prefect

ProgressOption = Annotated[bool, typer.Option(help="Live progress bars: shards collected, training steps with loss, "
                                              "tokens/s and time left (on a terminal only).")]
StoreOption = Annotated[str | None, typer.Option(help="Shard store of the trajectories: a directory or fsspec URL. "
                                                 "Default: <work_dir>/trajectories.")]


@command("ingest", "model", precision=False)
def ingest(profile: Profile) -> None:
    """Ingest prompts (a preset, a Hugging Face dataset or a local file) into <work_dir>/prompts/."""
    if profile.ingest is None:
        raise UserError("no prompt source: give SOURCE (a preset, dataset id or file) or --config")
    if profile.model is None:
        raise UserError("no tokenizer: pass --model ID_OR_DIR (the teacher whose tokenizer renders and counts "
                        "the prompts) or --config configs/PROFILE.yaml")
    start_prefect(profile.work_dir, profile.tracking)
    from flows.ingest import ingest_prompts

    manifest = ingest_prompts(profile.ingest, profile.model, profile.work_dir, profile.tracking)
    dropped = {kind: manifest[f"train_{kind}"] + manifest[f"eval_{kind}"]
               for kind in ("empty", "duplicates", "too_long")}
    console.print(f"[bold]{manifest['train_rows']} train and {manifest['eval_rows']} eval prompts[/] in "
                  f"{profile.work_dir / 'prompts'} (template {manifest['template']}; dropped "
                  f"{dropped['duplicates']} duplicates, {dropped['empty']} empty, {dropped['too_long']} over "
                  f"{profile.ingest.max_prompt_tokens} tokens)", soft_wrap=True, highlight=False)


@command("teacher")
def teacher(profile: Profile, progress: ProgressOption = True) -> None:
    """Make the teacher in <work_dir>/teacher, or reuse it if made from the same inputs: the profile's `sft` (a
    pretrained model fine-tuned on the prompt source's answers), else its demo `teacher` (trained from scratch)."""
    announce_precision(profile.precision, profile.sft.model.device if profile.sft else "cpu")
    start_prefect(profile.work_dir, profile.tracking)
    from cllm_core.training.sft import describe_sft
    from cllm_core.training.teacher import describe_teacher
    from flows.teacher import sft_teacher, train_teacher

    with live_progress(progress):
        if profile.sft is not None:
            record = sft_teacher(profile.sft, profile.ingest, profile.work_dir, profile.tracking, profile.precision,
                                 profile.evaluate.check)
            line = f"[bold]domain teacher[/] {describe_sft(record)}"
        else:
            record = train_teacher(profile.teacher or TeacherConfig(), profile.work_dir, profile.tracking,
                                   profile.precision)
            line = f"[bold]demo teacher[/] {describe_teacher(record)}"
    console.print(line, soft_wrap=True, highlight=False)


@command("collect", "model")
def collect(
    profile: Profile,
    store: StoreOption = None,
    deployment: Annotated[str | None, typer.Option(help="Run each shard as a flow run of this deployment "
                                                   "(e.g. collect-shard/collect-shard) on its work pool.")] = None,
    task_runner: Annotated[Literal["threads", "dask"], typer.Option(
        help="What runs the local shard chains: Prefect's thread pool, or a local Dask cluster with a worker "
             "process per device (needs the dask extra).")] = "threads",
    progress: ProgressOption = True,
) -> None:
    """Collect Jacobi trajectories of <work_dir>/prompts/train.parquet into shards; reruns skip finished ones."""
    if profile.model is None:
        raise UserError("no teacher: pass --model ID_OR_DIR or --config configs/PROFILE.yaml")
    if task_runner == "dask" and importlib.util.find_spec("prefect_dask") is None:
        raise UserError("the dask task runner needs the dask extra: pip install 'cllm-pipeline[dask]'")
    announce_precision(profile.precision, profile.model.device)
    start_prefect(profile.work_dir, profile.tracking)
    from flows.collect import collect_trajectories
    from flows.collect import task_runner as runner

    flow = collect_trajectories.with_options(task_runner=runner(task_runner, profile.collect, profile.model))
    with live_progress(progress):
        summary = flow(profile.collect, profile.model, profile.work_dir, store, deployment, profile.tracking,
                       profile.precision)
    console.print(f"[bold]{summary['shards']} shards[/] in {summary['store']}: {summary['shards_collected']} "
                  f"collected, {summary['shards_skipped']} already done"
                  + (f"; {summary['prompts_per_s']:.2f} prompts/s, {summary['tokens_per_s']:.0f} tokens/s, "
                     f"{summary['mean_passes_per_block']:.2f} passes per block, {summary['repetitive']} repetitive"
                     if summary["shards_collected"] else ""), soft_wrap=True, highlight=False)


@command("finetune", "model")
def train(profile: Profile, store: StoreOption = None, progress: ProgressOption = True) -> None:
    """Consistency-fine-tune the teacher on its trajectories into <work_dir>/cllm; a killed run resumes."""
    if profile.model is None:
        raise UserError("no teacher: pass --model ID_OR_DIR or --config configs/PROFILE.yaml")
    announce_precision(profile.precision, profile.model.device)
    start_prefect(profile.work_dir, profile.tracking)
    from cllm_core.training.finetune import describe_cllm
    from flows.finetune import consistency_finetune

    with live_progress(progress):
        record = consistency_finetune(profile.finetune, profile.model, profile.work_dir, store, profile.tracking,
                                      profile.precision)
    registered = record.logged
    console.print(f"[bold]CLLM[/] {describe_cllm(record)}; logged as {registered['model_uri']}"
                  + (f", registered as {registered['registered_model']} v{registered['version']}"
                     if registered["registered_model"] else ""), soft_wrap=True, highlight=False)


@command(name="run")
def run_pipeline(profile: Profile, progress: ProgressOption = True) -> None:
    """The whole pipeline from one profile: (teacher) -> ingest -> collect -> fine-tune -> evaluate."""
    start_prefect(profile.work_dir, profile.tracking)
    announce_precision(profile.precision, profile.model.device if profile.model else "cpu")
    from cllm_core.evaluation.report import markdown_table
    from flows.pipeline import cllm_pipeline
    from tasks.tracking import tracking_uri

    with live_progress(progress):
        result = cllm_pipeline(profile)
    console.print(markdown_table(result["summary"]), highlight=False, soft_wrap=True)
    uri = masked(tracking_uri(profile.tracking, profile.work_dir))
    ui = f"open {uri}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"
    console.print(f"[bold]CLLM[/] in {result['cllm']}; evaluation in {profile.work_dir / 'eval'}; MLflow run "
                  f"{result['mlflow_run_id']} in {uri}. The MLflow UI: {ui}", highlight=False, soft_wrap=True)


@command("evaluate", name="eval")
def evaluate(
    profile: Profile,
    model: Annotated[list[str] | None, typer.Option(help="NAME=DIR_OR_ID, repeatable; the first is the baseline. "
                                                    "Default: teacher=<the profile's model> and, when it exists, "
                                                    "cllm=<work_dir>/cllm.", show_default=False)] = None,
) -> None:
    """Speed and quality of every model x method on <work_dir>/prompts/eval.parquet, into <work_dir>/eval/."""
    models = dict(_name_model(item, profile.model) for item in model or [])
    if not models:
        if profile.model is None:
            raise UserError("no models: pass --model teacher=DIR --model cllm=DIR or --config")
        models = {"teacher": profile.model}
        if (profile.work_dir / "cllm").is_dir():
            models["cllm"] = profile.model.derived(profile.work_dir / "cllm")
    announce_precision(profile.precision, next(iter(models.values())).device)
    start_prefect(profile.work_dir, profile.tracking)
    from cllm_core.evaluation.report import markdown_table
    from flows.evaluate import evaluate_speedup

    result = evaluate_speedup(profile.evaluate, models, profile.work_dir, profile.tracking, profile.precision)
    console.print(markdown_table(result.summary), highlight=False, soft_wrap=True)
    console.print(f"[bold]{result.prompts} prompts[/]; samples, summary and pictures in "
                  f"{profile.work_dir / 'eval'}", highlight=False, soft_wrap=True)


def _name_model(item: str, base: ModelConfig | None) -> tuple[str, ModelConfig]:
    """NAME=DIR_OR_ID, on the profile's model's device and attention kernel where the profile names one."""
    name, sep, source = item.partition("=")
    if not sep or not name or not source:
        raise UserError(f"--model expects NAME=DIR_OR_ID (e.g. cllm=runs/demo/cllm), got {item!r}")
    return name, base.derived(source) if base is not None else ModelConfig(name_or_path=source)
