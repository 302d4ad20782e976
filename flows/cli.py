"""`cllm`: one command, a sub-command per stage. Errors print one line and exit non-zero."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from cllm_core.config import (
    CollectConfig,
    DecodeConfig,
    EvalConfig,
    FinetuneConfig,
    IngestConfig,
    ModelConfig,
    Profile,
    TeacherConfig,
    TrackingConfig,
    describe,
    masked,
    read_profile,
    set_value,
)
from flows.server import REMEDY, TemporaryServer

app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console()
MODEL, DECODE = ModelConfig.model_fields, DecodeConfig.model_fields
INGEST, TEACHER, PROFILE = IngestConfig.model_fields, TeacherConfig.model_fields, Profile.model_fields
COLLECT, FINETUNE, EVAL = CollectConfig.model_fields, FinetuneConfig.model_fields, EvalConfig.model_fields
ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML profile from configs/; options override it.")]
WorkDirOption = Annotated[Path | None, typer.Option(help=PROFILE["work_dir"].description)]
PrecisionOption = Annotated[str | None, typer.Option(help=PROFILE["precision"].description)]
ProgressOption = Annotated[bool, typer.Option(help="Live progress bars: shards collected, training steps with loss, "
                                              "tokens/s and time left (on a terminal only).")]


@app.callback()
def main(context: typer.Context) -> None:
    """Consistency LLMs: Jacobi decoding, trajectory collection, consistency fine-tuning, evaluation."""
    context.call_on_close(stop_on_signals())


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # [dask] is no tag
    return typer.Exit(1)


@app.command()
def decode(
    prompt: Annotated[str, typer.Argument(help="The user prompt (rendered with the chat template if any).")],
    config: ConfigOption = None,
    model: Annotated[str | None, typer.Option(help=MODEL["name_or_path"].description)] = None,
    gguf_file: Annotated[str | None, typer.Option(help=MODEL["gguf_file"].description)] = None,
    precision: PrecisionOption = None,
    device: Annotated[str | None, typer.Option(help=MODEL["device"].description)] = None,
    n_tokens: Annotated[int | None, typer.Option(help=DECODE["n_tokens"].description)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help=DECODE["max_new_tokens"].description)] = None,
    init: Annotated[str | None, typer.Option(help=DECODE["init"].description)] = None,
    seed: Annotated[int | None, typer.Option(help=DECODE["seed"].description)] = None,
    chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template.")] = True,
    live: Annotated[bool, typer.Option(help="Redraw in place; --no-live prints one line per pass.")] = True,
) -> None:
    """Decode one prompt with Jacobi decoding and show every pass: committed tokens highlighted."""
    from cllm_core import jacobi_steps, load_model, load_tokenizer
    from cllm_core.prompts import encode, render

    with one_line_errors():
        profile = resolve_profile(config, model={"name_or_path": model, "gguf_file": gguf_file, "device": device},
                                  precision=precision,
                                  decode={"n_tokens": n_tokens, "max_new_tokens": max_new_tokens, "init": init,
                                          "seed": seed})
        if profile.model is None:
            raise ValueError("no model: pass --model ID_OR_DIR or --config configs/PROFILE.yaml")
        lm = load_model(profile.model, announce_precision(profile.precision, profile.model.device).dtype)
        tokenizer = load_tokenizer(profile.model)
        ids, mask = encode(tokenizer, [render(tokenizer, prompt, chat)], lm.device, chat)
        steps = jacobi_steps(lm, ids, mask, **profile.decode.model_dump())

    view = TrajectoryView(tokenizer)
    start = time.perf_counter()
    if live:
        with Live(view.render(), console=console, auto_refresh=False, transient=False) as screen:
            for step in steps:
                view.add(step)
                screen.update(view.render(), refresh=True)
    else:
        for step in steps:
            view.add(step)
            console.print(view.line())
    seconds = time.perf_counter() - start
    console.print(f"[bold]{view.tokens} tokens in {view.passes} forwards[/]: {view.tokens / view.passes:.2f} "
                  f"tokens per forward, {view.fast_forward} fast-forwarded, {view.stationary} stationary, "
                  f"{seconds:.2f}s ({view.tokens / seconds:.1f} tokens/s)", soft_wrap=True)


@app.command()
def ingest(
    source: Annotated[str | None, typer.Argument(help=INGEST["source"].description, show_default=False)] = None,
    config: ConfigOption = None,
    preset: Annotated[str | None, typer.Option(help=INGEST["preset"].description)] = None,
    field: Annotated[list[str] | None, typer.Option(help="ROLE=COLUMN, repeatable: " + INGEST["fields"].description,
                                                    show_default=False)] = None,
    template: Annotated[str | None, typer.Option(help=INGEST["template"].description)] = None,
    subset: Annotated[str | None, typer.Option(help=INGEST["subset"].description)] = None,
    train_split: Annotated[str | None, typer.Option(help=INGEST["train_split"].description)] = None,
    eval_split: Annotated[str | None, typer.Option(help=INGEST["eval_split"].description)] = None,
    eval_fraction: Annotated[float | None, typer.Option(help=INGEST["eval_fraction"].description)] = None,
    max_train: Annotated[int | None, typer.Option(help=INGEST["max_train"].description)] = None,
    max_eval: Annotated[int | None, typer.Option(help=INGEST["max_eval"].description)] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help=INGEST["max_prompt_tokens"].description)] = None,
    seed: Annotated[int | None, typer.Option(help=INGEST["seed"].description)] = None,
    model: Annotated[str | None, typer.Option(help="Tokenizer to render and count prompts with: "
                                              + MODEL["name_or_path"].description)] = None,
    gguf_file: Annotated[str | None, typer.Option(help=MODEL["gguf_file"].description)] = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Ingest prompts (a preset, a Hugging Face dataset or a local file) into <work_dir>/prompts/."""
    with one_line_errors():
        fields = dict(_role_column(item) for item in field or []) or None
        profile = resolve_profile(
            config, work_dir, model={"name_or_path": model, "gguf_file": gguf_file},
            ingest={"source": source, "preset": preset, "fields": fields, "template": template, "subset": subset,
                    "train_split": train_split, "eval_split": eval_split, "eval_fraction": eval_fraction,
                    "max_train": max_train, "max_eval": max_eval, "max_prompt_tokens": max_prompt_tokens,
                    "seed": seed})
        if profile.ingest is None:
            raise ValueError("no prompt source: give SOURCE (a preset, dataset id or file) or --config")
        if profile.model is None:
            raise ValueError("no tokenizer: pass --model ID_OR_DIR (the teacher whose tokenizer renders and counts "
                             "the prompts) or --config configs/PROFILE.yaml")
        start_prefect(profile.work_dir, profile.tracking)
        import datasets

        from flows.ingest import ingest_prompts

        datasets.disable_progress_bars()
        manifest = ingest_prompts(profile.ingest, profile.model, profile.work_dir, profile.tracking)
    dropped = {kind: manifest[f"train_{kind}"] + manifest[f"eval_{kind}"]
               for kind in ("empty", "duplicates", "too_long")}
    console.print(f"[bold]{manifest['train_rows']} train and {manifest['eval_rows']} eval prompts[/] in "
                  f"{profile.work_dir / 'prompts'} (template {manifest['template']}; dropped "
                  f"{dropped['duplicates']} duplicates, {dropped['empty']} empty, {dropped['too_long']} over "
                  f"{profile.ingest.max_prompt_tokens} tokens)", soft_wrap=True, highlight=False)


@app.command()
def teacher(
    config: ConfigOption = None,
    max_minutes: Annotated[float | None, typer.Option(help=TEACHER["max_minutes"].description)] = None,
    steps: Annotated[int | None, typer.Option(help=TEACHER["steps"].description)] = None,
    train_problems: Annotated[int | None, typer.Option(help=TEACHER["train_problems"].description)] = None,
    seed: Annotated[int | None, typer.Option(help=TEACHER["seed"].description)] = None,
    min_accuracy: Annotated[float | None, typer.Option(help=TEACHER["min_accuracy"].description)] = None,
    precision: PrecisionOption = None,
    work_dir: WorkDirOption = None,
    progress: ProgressOption = True,
) -> None:
    """Train the demo teacher from scratch into <work_dir>/teacher, or reuse it if its config is unchanged."""
    with one_line_errors():
        profile = resolve_profile(config, work_dir, precision=precision,
                                  teacher={"max_minutes": max_minutes, "steps": steps, "train_problems": train_problems,
                                           "seed": seed, "min_accuracy": min_accuracy})
        announce_precision(profile.precision, "cpu")
        start_prefect(profile.work_dir, profile.tracking)
        from cllm_core.teacher import describe_teacher
        from flows.teacher import train_teacher

        with live_progress(progress):
            record = train_teacher(profile.teacher or TeacherConfig(), profile.work_dir, profile.tracking,
                                   profile.precision)
    console.print(f"[bold]demo teacher[/] {describe_teacher(record)}", soft_wrap=True, highlight=False)


@app.command()
def collect(
    config: ConfigOption = None,
    n_tokens: Annotated[int | None, typer.Option(help=COLLECT["n_tokens"].description)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help=COLLECT["max_new_tokens"].description)] = None,
    init: Annotated[str | None, typer.Option(help=COLLECT["init"].description)] = None,
    seed: Annotated[int | None, typer.Option(help=COLLECT["seed"].description)] = None,
    batch_size: Annotated[int | None, typer.Option(help=COLLECT["batch_size"].description)] = None,
    shard_size: Annotated[int | None, typer.Option(help=COLLECT["shard_size"].description)] = None,
    limit: Annotated[int | None, typer.Option(help=COLLECT["limit"].description)] = None,
    device: Annotated[list[str] | None, typer.Option(help=COLLECT["devices"].description, show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help=MODEL["name_or_path"].description)] = None,
    gguf_file: Annotated[str | None, typer.Option(help=MODEL["gguf_file"].description)] = None,
    store: Annotated[str | None, typer.Option(help="Shard store: a directory or fsspec URL. Default: "
                                              "<work_dir>/trajectories.")] = None,
    deployment: Annotated[str | None, typer.Option(help="Run each shard as a flow run of this deployment "
                                                   "(e.g. collect-shard/collect-shard) on its work pool.")] = None,
    work_dir: WorkDirOption = None,
    task_runner: Annotated[Literal["threads", "dask"], typer.Option(
        help="What runs the local shard chains: Prefect's thread pool, or a local Dask cluster with a worker "
             "process per device (needs the dask extra).")] = "threads",
    precision: PrecisionOption = None,
    progress: ProgressOption = True,
) -> None:
    """Collect Jacobi trajectories of <work_dir>/prompts/train.parquet into shards; reruns skip finished ones."""
    with one_line_errors():
        profile = resolve_profile(
            config, work_dir, model={"name_or_path": model, "gguf_file": gguf_file}, precision=precision,
            collect={"n_tokens": n_tokens, "max_new_tokens": max_new_tokens, "init": init, "seed": seed,
                     "batch_size": batch_size, "shard_size": shard_size, "limit": limit, "devices": device})
        if profile.model is None:
            raise ValueError("no teacher: pass --model ID_OR_DIR or --config configs/PROFILE.yaml")
        if task_runner == "dask" and importlib.util.find_spec("prefect_dask") is None:
            raise ValueError("the dask task runner needs the dask extra: pip install 'cllm-pipeline[dask]'")
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


@app.command()
def train(
    config: ConfigOption = None,
    steps: Annotated[int | None, typer.Option(help=FINETUNE["steps"].description)] = None,
    max_minutes: Annotated[float | None, typer.Option(help=FINETUNE["max_minutes"].description)] = None,
    batch_size: Annotated[int | None, typer.Option(help=FINETUNE["batch_size"].description)] = None,
    lr: Annotated[float | None, typer.Option(help=FINETUNE["lr"].description)] = None,
    consistency: Annotated[str | None, typer.Option(help=FINETUNE["consistency"].description)] = None,
    consistency_weight: Annotated[float | None, typer.Option(help=FINETUNE["consistency_weight"].description)] = None,
    ar_weight: Annotated[float | None, typer.Option(help=FINETUNE["ar_weight"].description)] = None,
    ar_labels: Annotated[str | None, typer.Option(help=FINETUNE["ar_labels"].description)] = None,
    precision: PrecisionOption = None,
    seed: Annotated[int | None, typer.Option(help=FINETUNE["seed"].description)] = None,
    model: Annotated[str | None, typer.Option(help="The teacher: " + MODEL["name_or_path"].description)] = None,
    store: Annotated[str | None, typer.Option(help="Shard store of the trajectories. Default: "
                                              "<work_dir>/trajectories.")] = None,
    work_dir: WorkDirOption = None,
    progress: ProgressOption = True,
) -> None:
    """Consistency-fine-tune the teacher on its trajectories into <work_dir>/cllm; a killed run resumes."""
    with one_line_errors():
        profile = resolve_profile(
            config, work_dir, model={"name_or_path": model}, precision=precision,
            finetune={"steps": steps, "max_minutes": max_minutes, "batch_size": batch_size, "lr": lr,
                      "consistency": consistency, "consistency_weight": consistency_weight, "ar_weight": ar_weight,
                      "ar_labels": ar_labels, "seed": seed})
        if profile.model is None:
            raise ValueError("no teacher: pass --model ID_OR_DIR or --config configs/PROFILE.yaml")
        announce_precision(profile.precision, profile.model.device)
        start_prefect(profile.work_dir, profile.tracking)
        from cllm_core.finetune import describe_cllm
        from flows.finetune import consistency_finetune

        with live_progress(progress):
            record = consistency_finetune(profile.finetune, profile.model, profile.work_dir, store, profile.tracking,
                                          profile.precision)
    registered = record["logged"]
    console.print(f"[bold]CLLM[/] {describe_cllm(record)}; logged as {registered['model_uri']}"
                  + (f", registered as {registered['registered_model']} v{registered['version']}"
                     if registered["registered_model"] else ""), soft_wrap=True, highlight=False)


@app.command(name="run")
def run_pipeline(
    config: ConfigOption = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="SECTION.FIELD=VALUE, repeatable: override one "
                                                   "profile value (YAML syntax), e.g. collect.n_tokens=32.",
                                                   show_default=False)] = None,
    work_dir: WorkDirOption = None,
    progress: ProgressOption = True,
) -> None:
    """The whole pipeline from one profile: (teacher) -> ingest -> collect -> fine-tune -> evaluate."""
    with one_line_errors():
        profile = resolve_profile(config, work_dir, overrides=set_ or [])
        start_prefect(profile.work_dir, profile.tracking)
        announce_precision(profile.precision, profile.model.device if profile.model else "cpu")
        from cllm_core.report import markdown_table
        from flows.pipeline import cllm_pipeline
        from tasks.tracking import tracking_uri

        with live_progress(progress):
            result = cllm_pipeline(profile)
    console.print(markdown_table(result["summary"]), highlight=False, soft_wrap=True)
    uri = masked(tracking_uri(profile.tracking, profile.work_dir))
    ui = f"open {uri}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"
    console.print(f"[bold]CLLM[/] in {result['cllm']}; evaluation in {profile.work_dir / 'eval'}; MLflow run "
                  f"{result['mlflow_run_id']} in {uri}. The MLflow UI: {ui}", highlight=False, soft_wrap=True)


@app.command()
def ui(
    config: ConfigOption = None,
    work_dir: WorkDirOption = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the UI on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the UI.")] = 5000,
) -> None:
    """Open the MLflow UI on the work dir's tracking store (http://127.0.0.1:5000 by default)."""
    import subprocess
    import sys

    with one_line_errors():
        profile = resolve_profile(config, work_dir)
        from tasks.tracking import tracking_uri

        uri = tracking_uri(profile.tracking, profile.work_dir)
    if uri.startswith(("http://", "https://")):
        console.print(f"the runs are on the tracking server {uri}: open it in a browser", highlight=False)
        return
    console.print(f"MLflow UI for {masked(uri)} on http://{host}:{port} (Ctrl-C stops it)", highlight=False)
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                      "--host", host, "--port", str(port)]))


@app.command(name="eval")
def evaluate(
    config: ConfigOption = None,
    model: Annotated[list[str] | None, typer.Option(help="NAME=DIR_OR_ID, repeatable; the first is the baseline. "
                                                    "Default: teacher=<the profile's model> and, when it exists, "
                                                    "cllm=<work_dir>/cllm.", show_default=False)] = None,
    method: Annotated[list[str] | None, typer.Option(help=EVAL["methods"].description, show_default=False)] = None,
    n_tokens: Annotated[int | None, typer.Option(help=EVAL["n_tokens"].description)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help=EVAL["max_new_tokens"].description)] = None,
    batch_size: Annotated[int | None, typer.Option(help=EVAL["batch_size"].description)] = None,
    limit: Annotated[int | None, typer.Option(help=EVAL["limit"].description)] = None,
    precision: PrecisionOption = None,
    work_dir: WorkDirOption = None,
) -> None:
    """Speed and quality of every model x method on <work_dir>/prompts/eval.parquet, into <work_dir>/eval/."""
    with one_line_errors():
        profile = resolve_profile(config, work_dir, precision=precision,
                                  evaluate={"methods": method, "n_tokens": n_tokens, "max_new_tokens": max_new_tokens,
                                            "batch_size": batch_size, "limit": limit})
        models = dict(_name_model(item) for item in model or [])
        if not models:
            if profile.model is None:
                raise ValueError("no models: pass --model teacher=DIR --model cllm=DIR or --config")
            models = {"teacher": profile.model}
            if (profile.work_dir / "cllm").is_dir():
                models["cllm"] = ModelConfig(name_or_path=str(profile.work_dir / "cllm"))
        announce_precision(profile.precision, next(iter(models.values())).device)
        start_prefect(profile.work_dir, profile.tracking)
        from cllm_core.report import markdown_table
        from flows.evaluate import evaluate_speedup

        result = evaluate_speedup(profile.evaluate, models, profile.work_dir, profile.tracking, profile.precision)
    console.print(markdown_table(result["summary"]), highlight=False, soft_wrap=True)
    console.print(f"[bold]{result['prompts']} prompts[/]; samples, summary and pictures in "
                  f"{profile.work_dir / 'eval'}", highlight=False, soft_wrap=True)


@app.command()
def compare(
    runs: Annotated[list[str] | None, typer.Argument(help="MLflow run ids (default: the two latest evaluations).",
                                                     show_default=False)] = None,
    work_dir: WorkDirOption = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "cllm",
) -> None:
    """MLflow runs side by side: the parameters that differ, then the headline metrics."""
    from rich.table import Table

    with one_line_errors():
        from tasks.tracking import compare_runs

        columns, rows = compare_runs(runs or [], work_dir or Path("runs/demo"), experiment)
    table = Table("", *columns, title="runs side by side: differing parameters, then headline metrics")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def announce_precision(setting: str, device: str):
    """Resolve the precision once for this process and say it, before any work: the same choice every stage uses."""
    from cllm_core.precision import resolve

    resolved = resolve(setting, device)
    console.print(resolved.describe(), highlight=False, soft_wrap=True)
    return resolved


@contextmanager
def live_progress(enabled: bool) -> Iterator[None]:
    """Bars for the long stages: one per training stage (step of total, loss, tokens/s, time left) and one that
    advances per collected shard with its throughput. They draw on the console of Prefect's log handler, so
    log lines scroll above them instead of through them; off unless both ends are terminals."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.theme import Theme

    from flows.collect import shard_listener
    from tasks.progress import step_listener

    screen = next((handler.console for handler in _prefect_console_handlers()), console)
    if not (enabled and console.is_terminal and screen.is_terminal):
        yield
        return
    bars: dict[str, int] = {}
    failed: list[int] = []

    def bar(name: str, total: int | None) -> int:
        if name not in bars:
            bars[name] = board.add_task(name, total=total, news="", failed="")
        return bars[name]

    def show_shards(collected: int, total: int, shard: int | None, manifest: dict | None) -> None:
        news = {}
        if manifest is not None:
            news["news"] = (f"shard {shard}: {manifest['prompts_per_s']:.2f} prompts/s, "
                            f"{manifest['tokens_per_s']:.0f} tokens/s, "
                            f"{manifest['mean_passes_per_block']:.2f} passes per block")
        elif shard is not None:
            failed.append(shard)
            news["failed"] = f"failed: {failed}"
        board.update(bar("shards", total), total=total, completed=collected, **news)

    def show_steps(stage: str, step: int, steps: int, figures: dict) -> None:
        loss = figures.get("loss", figures.get("train_loss"))
        news = f"loss {loss:.3f}, {figures.get('tokens_per_s', 0):.0f} tokens/s" if loss is not None else ""
        board.update(bar(stage, steps), total=steps, completed=step, news=news)

    screen.push_theme(Theme())  # Prefect's theme has only its log styles; the bars need rich's own
    shards, steps = shard_listener.set(show_shards), step_listener.set(show_steps)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[news]}"),
                      TextColumn("{task.fields[failed]}", style="red"), console=screen) as board:
            yield
    finally:
        shard_listener.reset(shards)
        step_listener.reset(steps)
        screen.pop_theme()


def _name_model(item: str) -> tuple[str, ModelConfig]:
    name, sep, source = item.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--model expects NAME=DIR_OR_ID (e.g. cllm=runs/demo/cllm), got {item!r}")
    return name, ModelConfig(name_or_path=source)


def _role_column(item: str) -> tuple[str, str]:
    role, sep, column = item.partition("=")
    if not sep or not role or not column:
        raise ValueError(f"--field expects ROLE=COLUMN (e.g. question=instruction), got {item!r}")
    return role, column


def resolve_profile(path: Path | None, work_dir: Path | None = None, overrides: list[str] = (),
                    precision: str | None = None, **sections: dict) -> Profile:
    """The profile at `path` (or the defaults), with `--set SECTION.FIELD=VALUE` overrides, then each section
    overridden by the options the user gave."""
    data = read_profile(path) if path else {}
    if precision is not None:
        data["precision"] = precision
    for item in overrides:
        set_value(data, item)
    for name, options in sections.items():
        given = {key: value for key, value in options.items() if value is not None}
        if given:
            data[name] = (data.get(name) or {}) | given
    if work_dir is not None:
        data["work_dir"] = work_dir
    return Profile.model_validate(data)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input ends the command with one line and exit code 1, never a traceback."""
    try:
        yield
    except ValidationError as error:
        _drop_new_work_dir()
        raise fail(describe(error)) from None
    except _input_errors() as error:
        _drop_new_work_dir()
        raise fail(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (stop_on_signals), wherever it landed
        from cllm_core.stopping import request_stop

        request_stop()  # in case it came another way: no thread may keep the process alive
        console.print(f"[bold red]stopped:[/] {STOPPED}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _input_errors() -> tuple[type[Exception], ...]:
    """What bad input raises. ShardsFailed counts once its module is loaded (it loads pyarrow: not for --help)."""
    shards = sys.modules.get("cllm_core.shards")
    return (ValueError, OSError, TypeError, KeyError) + ((shards.ShardsFailed,) if shards else ())


STOPPED = "stopped at your request; run the same command again to resume"


def stop_on_signals() -> Callable[[], None]:
    """Make SIGTERM and Ctrl-C ask every long loop to stop (cllm_core.stopping) and interrupt the main thread, so
    a command ends within about one Jacobi pass or training step, with one line; returns what undoes it. During a
    flow Prefect's SIGTERM handler raises in the main thread instead, and the flows pass the request on."""
    from cllm_core.stopping import clear_stop

    clear_stop()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def _stop(signum: int, frame) -> None:
    from cllm_core.stopping import Stopped, request_stop

    request_stop()
    raise Stopped(STOPPED)


def start_prefect(work_dir: Path, tracking: TrackingConfig) -> None:
    """Make Prefect's API answer before any flow starts, or say in one line why not. Unless the user points
    Prefect elsewhere, its state lives in the work dir and its temporary server (flows/server.py) boots while this
    process does what every stage needs first: import Prefect and the model code, set up the MLflow store (a new
    SQLite store takes seconds). Prefect reads its settings once, on import: they are all set before. Prefect
    attaches its console handler when it is imported: bad-input tracebacks are kept off it. Credentials in
    $MLFLOW_TRACKING_URI move to MLflow's variables, so the processes Prefect starts get the bare URI. A tracking
    server that does not answer is one line before the wait for Prefect's."""
    server = use_work_dir(work_dir)
    from tasks.tracking import check_tracking, move_credentials, tracking_uri

    move_credentials()
    import prefect.main  # noqa: F401  (importing it sets up Prefect's logging)

    quiet_input_errors()
    uri = tracking_uri(tracking, work_dir)
    check_tracking(uri)
    if uri.startswith("sqlite:"):
        import mlflow

        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    import cllm_core.models  # noqa: F401  (torch and transformers: every stage loads a tokenizer or a model)

    if server is not None:
        server.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    else:
        start_prefect_server()


def start_prefect_server() -> None:
    """Start Prefect's own temporary server now if it would start one at the first flow: a slow start is one line."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    try:
        SubprocessASGIServer().start()
    except RuntimeError as error:
        raise ConnectionError(f"Prefect's temporary server did not come up ({str(error).splitlines()[0]}); "
                              f"{REMEDY}") from None


def quiet_input_errors() -> None:
    """Drop the traceback of bad-input errors from Prefect's terminal output (its API log keeps it)."""
    for handler in _prefect_console_handlers():
        if not any(isinstance(f, _QuietInputErrors) for f in handler.filters):
            handler.addFilter(_QuietInputErrors())


def _prefect_console_handlers() -> list[logging.Handler]:
    return [handler for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers
            if type(handler).__name__ == "PrefectConsoleHandler"]


class _QuietInputErrors(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for bad input the one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], _input_errors()):
            record.exc_info = record.exc_text = None
        return True


def use_work_dir(work_dir: Path) -> TemporaryServer | None:
    """Keep Prefect's local state in the work dir and start its temporary server there, unless the user points
    Prefect elsewhere. Returns the server; None if Prefect was imported already: it has read its settings then,
    and starts its own server, which still finds the work dir in $PREFECT_HOME."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if "PREFECT_API_URL" in os.environ or "PREFECT_HOME" in os.environ:
        return None
    home = work_dir / ".prefect"
    if not work_dir.exists():
        _created["work_dir"] = work_dir
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home.resolve())
    if "prefect" in sys.modules:
        return None
    server = _created["server"] = TemporaryServer(home)
    os.environ["PREFECT_API_URL"] = server.url
    os.environ["PREFECT_UI_URL"] = ""  # it serves no UI: no "View at" links that lead nowhere
    return server


_created: dict = {}  # the work dir this command created for Prefect's state, and the server it started there


def _drop_new_work_dir() -> None:
    """A command refused before any work leaves no work dir behind: only Prefect's state would be in it."""
    work_dir, server = _created.pop("work_dir", None), _created.pop("server", None)
    if work_dir is not None and [p.name for p in work_dir.iterdir()] == [".prefect"]:
        if server is not None:
            server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


class TrajectoryView:
    """The paper's figure in a terminal: the response so far, this pass's commits in green, the guess in red."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.committed: list[int] = []
        self.step = None
        self.passes = self.tokens = self.fast_forward = self.stationary = 0

    def add(self, step) -> None:
        (row,) = step.rows
        self.step, self.passes = row, self.passes + 1
        self.committed += row.committed
        self.tokens += len(row.committed)
        self.fast_forward += row.fast_forward
        self.stationary += row.stationary

    def piece(self, tokens, style: str, inline: bool = False) -> Text:
        text = self.tokenizer.decode(list(tokens))
        return Text(text.replace("\n", "↵") if inline else text, style=style)

    def line(self) -> Text:
        """One pass: the block as fed, its earlier commits dim, this pass's commits green, the rest red."""
        row = self.step
        return Text.assemble(f"pass {self.passes:3d}  block {row.block:2d}  +{len(row.committed):2d}  ",
                             self.piece(row.state[: row.prefix], "dim", True),
                             self.piece(row.committed, "bold green", True),
                             self.piece(row.state[row.prefix + len(row.committed) :], "red", True))

    def render(self) -> Group:
        if self.step is None:
            return Group(Text("prefill ...", style="dim"))
        new = len(self.step.committed)
        body = Text.assemble(self.piece(self.committed[:-new], "default"),
                             self.piece(self.committed[-new:], "bold black on green"))
        status = Text(f"pass {self.passes}: block {self.step.block}, +{new} tokens "
                      f"({self.tokens / self.passes:.2f} per forward)", style="dim")
        return Group(body, self.line(), status)


if __name__ == "__main__":
    app()
