"""Time `cllm run` from nothing, split by stage, and the Prefect + MLflow overhead; print the demo's results.

    python -m benchmarks.pipeline --config configs/demo.yaml --work-dir /tmp/demo-bench --json runs/bench-pipeline.json

It runs the command users run, in a new work dir (the teacher trained, nothing cached), with Prefect's state in
`<work_dir>/.prefect`, then reads the record back: every stage's wall time is its subflow run's, and its work is
the time its tasks ran (training, collection, decoding, the data steps, model loading). What is left is
overhead: interpreter start and imports, the temporary Prefect server, flow and task orchestration, MLflow runs,
params, metrics and artifacts, and logging and registering the CLLM (`log-cllm`, counted as overhead). The
fine-tuning task streams metrics to MLflow while it trains; that small share stays inside its work. Work is a
sum of task times, so with shards collected on several devices at once it can exceed the stage's wall time.
The run records into the work dir's MLflow store, whatever MLFLOW_TRACKING_URI says.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import write_json
from flows.cli import use_work_dir
from flows.collect import collect_trajectories
from flows.evaluate import evaluate_speedup
from flows.finetune import consistency_finetune
from flows.ingest import ingest_prompts
from flows.teacher import train_teacher
from tasks.finetune import log_cllm

STAGES = {train_teacher.name: "teacher", ingest_prompts.name: "ingest", collect_trajectories.name: "collect",
          consistency_finetune.name: "finetune", evaluate_speedup.name: "evaluate"}
OVERHEAD_TASKS = (log_cllm.name,)  # MLflow's own work inside a stage


def time_cllm_run(config: Path, work_dir: Path, extra: list[str]) -> tuple[float, int]:
    """`cllm run` in a subprocess, its output passed through and kept in `<work_dir>/pipeline.log`."""
    work_dir.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items()
           if key not in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")}
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--work-dir", str(work_dir), *extra]
    start = time.perf_counter()
    with open(work_dir / "pipeline.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
    return time.perf_counter() - start, process.wait()


def stage_times(work_dir: Path) -> dict[str, dict]:
    """Per stage: wall seconds of its flow run, and seconds its tasks ran (work) and MLflow tasks ran."""
    for name in ("PREFECT_API_URL", "PREFECT_HOME"):
        os.environ.pop(name, None)
    use_work_dir(work_dir)  # the state `cllm run` left in <work_dir>/.prefect
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_runs, task_runs = read_all(client.read_flow_runs), read_all(client.read_task_runs)
        names = {run.id: client.read_flow(run.flow_id).name for run in flow_runs}
    task_flow = {task.id: task.flow_run_id for task in task_runs}
    parent = {run.id: task_flow.get(run.parent_task_run_id) for run in flow_runs}

    # a stage flow run's stage: its `stage` parameter where it was given one (collect-round2), else its flow's
    stage_run = {run.id: (run.parameters or {}).get("stage") or STAGES[names[run.id]] for run in flow_runs
                 if names[run.id] in STAGES}

    def stage_of(flow_run_id) -> str | None:
        while flow_run_id is not None and flow_run_id not in stage_run:
            flow_run_id = parent.get(flow_run_id)
        return stage_run.get(flow_run_id)

    stages = {}
    for run in flow_runs:
        if run.id in stage_run:
            stages[stage_run[run.id]] = {"wall_s": (run.end_time - run.start_time).total_seconds(),
                                         "work_s": 0.0, "mlflow_tasks_s": 0.0, "tasks": 0,
                                         "started": run.start_time.isoformat()}
    stand_ins = {run.parent_task_run_id for run in flow_runs}  # the task run a parent flow keeps per subflow
    for task in task_runs:
        stage = stage_of(task.flow_run_id)
        if stage is None or task.id in stand_ins:
            continue
        if task.end_time is None:  # never finished: its time would count as overhead, so say so
            stages[stage]["unfinished_tasks"] = stages[stage].get("unfinished_tasks", 0) + 1
            continue
        seconds = task.total_run_time.total_seconds()
        key = "mlflow_tasks_s" if task.name.startswith(OVERHEAD_TASKS) else "work_s"
        stages[stage][key] += seconds
        stages[stage]["tasks"] += 1
    return stages


def read_all(read, page: int = 200) -> list:
    """Every record of a Prefect read call, page by page: the server returns at most 200 at a time."""
    found = []
    while batch := read(limit=page, offset=len(found)):
        found += batch
        if len(batch) < page:
            break
    return found


def headline(work_dir: Path) -> dict[str, float]:
    """The pipeline parent run's headline metrics from the work dir's MLflow store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{(work_dir / 'mlflow.db').resolve()}")
    (parent,) = mlflow.search_runs(experiment_names=["cllm"], filter_string="tags.`cllm.stage` = 'pipeline'",
                                   output_format="list")
    return parent.data.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--work-dir", type=Path, required=True, help="a new directory: the run starts from nothing")
    parser.add_argument("--set", dest="set_", action="append", default=[], help="SECTION.FIELD=VALUE, as cllm run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.work_dir.exists():
        parser.error(f"{args.work_dir} exists; the benchmark times a run from nothing: give a new --work-dir")
    if any(item.startswith("tracking.") for item in args.set_):
        parser.error("the benchmark records into the work dir's MLflow store; leave tracking.* unset")

    load_before = os.getloadavg()[0]
    wall, code = time_cllm_run(args.config, args.work_dir, [f"--set={item}" for item in args.set_])
    if code != 0:
        sys.exit(f"error: cllm run exited {code}; its output is in {args.work_dir / 'pipeline.log'}")
    stages = stage_times(args.work_dir)
    metrics = headline(args.work_dir)

    work = sum(stage["work_s"] for stage in stages.values())
    outside = wall - sum(stage["wall_s"] for stage in stages.values())
    print("\n| stage | wall s | work s | overhead s |\n|---|---|---|---|")
    for name in sorted(stages, key=lambda name: stages[name]["started"]):  # in the order they ran
        wall_s, work_s = stages[name]["wall_s"], stages[name]["work_s"]
        print(f"| {name} | {wall_s:.1f} | {work_s:.1f} | {wall_s - work_s:.1f} |")
    print(f"| outside the stages (start, imports, Prefect server) | {outside:.1f} | 0.0 | {outside:.1f} |")
    print(f"| **total** | **{wall:.1f}** | **{work:.1f}** | **{wall - work:.1f}** ({(wall - work) / wall:.1%}) |")

    unfinished = {name: stage["unfinished_tasks"] for name, stage in stages.items() if "unfinished_tasks" in stage}
    if unfinished:
        print(f"task runs the record shows unfinished (their time counts as overhead): {unfinished}")

    def metric(key: str) -> float:
        return metrics.get(key, float("nan"))

    teacher_accuracy = metric("teacher.ar.accuracy")
    result = {
        "config": str(args.config), "set": args.set_, "wall_s": wall, "work_s": work, "overhead_s": wall - work,
        "overhead_share": (wall - work) / wall, "outside_stages_s": outside, "stages": stages,
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0], "cpus": os.cpu_count(),
        "cllm_jacobi_tokens_per_forward": metric("cllm.jacobi.tokens_per_forward"),
        "cllm_jacobi_speedup": metric("cllm.jacobi.speedup"), "cllm_jacobi_accuracy": metric("cllm.jacobi.accuracy"),
        "teacher_ar_accuracy": teacher_accuracy,
    }
    print(f"\n{wall / 60:.1f} minutes end to end (goal: at most 15), overhead {result['overhead_share']:.1%} "
          f"(goal: at most 5%); CLLM Jacobi {result['cllm_jacobi_tokens_per_forward']:.2f} tokens per forward "
          f"(goal: at least 3.0), {result['cllm_jacobi_speedup']:.2f}x the teacher's AR (goal: at least 2.0x), "
          f"accuracy {result['cllm_jacobi_accuracy']:.1%} vs the teacher's {teacher_accuracy:.1%} (goal: within 2 "
          f"points); load average {load_before:.2f} before, {result['load_average_after']:.2f} after")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
