"""Time `cllm run` from nothing, split by stage, and the Prefect + MLflow overhead; print the demo's results.

    python -m benchmarks.pipeline --config configs/demo.yaml --work-dir /tmp/demo-bench

It writes `benchmarks/results/demo-<cpu class>.json` (`--json` elsewhere): the commit, the CPU class, the command,
the stage table, the evaluation's table and the demo's goals, each MET or NOT MET. The README's first table is made
from the committed files: `python -m benchmarks.pipeline --report-only --readme`.

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
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import between_markers, cpu_class, git_commit, write_json
from flows.cli import use_work_dir
from flows.collect import collect_trajectories
from flows.evaluate import evaluate_speedup
from flows.finetune import consistency_finetune
from flows.ingest import ingest_prompts
from flows.teacher import train_teacher
from tasks.finetune import log_cllm

GOALS = {  # issue #34: (figure, at least / at most, goal)
    "minutes": ("at most", 10.0), "cllm_tokens_per_forward": ("at least", 4.5),
    "speedup_vs_fastest_ar": ("at least", 3.0), "wall_share_of_tokens_per_forward": ("at least", 0.75),
    "accuracy_drop": ("at most", 0.01), "identical_to_teacher": ("at least", 0.99),
    "teacher_accuracy": ("at least", 0.95), "repetition": ("at most", 0.0), "identical_to_own_ar": ("at least", 1.0)}
LOSSLESS = ("jacobi", "jacobi_lookup", "jacobi_multiblock", "jacobi_recycling")  # equal to AR in fp32
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


def figures(table: list[dict], minutes: float) -> dict:
    """The demo's headline figures from the evaluation's table: the CLLM's fastest lossless decoder against the
    teacher's fastest AR (the loop's own, or `generate` where it was decoded and faster)."""
    best = max((r for r in table if r["model"] == "cllm" and r["method"] in LOSSLESS), key=lambda r: r["tokens_per_s"])
    fastest_ar = max(r["tokens_per_s"] for r in table if r["model"] == "teacher" and r["method"] in ("ar", "generate"))
    teacher = next(r for r in table if (r["model"], r["method"]) == ("teacher", "ar"))
    speedup = best["tokens_per_s"] / fastest_ar
    return {"minutes": minutes, "cllm_decoder": best["method"], "cllm_tokens_per_forward": best["tokens_per_forward"],
            "speedup_vs_fastest_ar": speedup, "wall_share_of_tokens_per_forward": speedup / best["tokens_per_forward"],
            "cllm_accuracy": best["accuracy"], "teacher_accuracy": teacher["accuracy"],
            "accuracy_drop": teacher["accuracy"] - best["accuracy"], "identical_to_teacher": best["same_as_baseline"],
            "repetition": max(r["repetition_rate"] for r in table),
            "identical_to_own_ar": min(r["exact_match"] for r in table if r["method"] in LOSSLESS)}


def verdicts(found: dict, goals: dict = GOALS) -> dict:
    return {name: {"value": found[name], "goal": goal, "direction": direction,
                   "met": found[name] >= goal if direction == "at least" else found[name] <= goal + 1e-12}
            for name, (direction, goal) in goals.items()}


def markdown(results: list[dict]) -> str:
    """The README's demo table: a row per results file (a CPU class each)."""
    lines = ["| CPU class | commit | whole run | teacher accuracy | CLLM decoder | tokens per forward | vs fastest AR "
             "| wall / tokens per forward | CLLM accuracy | same output as teacher | outputs = own AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["figures"]
        lines.append(f"| {r['cpu_capability']} | {r['commit'][:7]} | {f['minutes']:.1f} min | "
                     f"{f['teacher_accuracy']:.1%} | {f['cllm_decoder']} | **{f['cllm_tokens_per_forward']:.2f}** | "
                     f"**{f['speedup_vs_fastest_ar']:.2f}x** | {f['wall_share_of_tokens_per_forward']:.2f} | "
                     f"{f['cllm_accuracy']:.1%} | {f['identical_to_teacher']:.1%} | {f['identical_to_own_ar']:.0%} |")
    return "\n".join(lines)


RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
TABLE = ("<!-- demo table: python -m benchmarks.pipeline --report-only --readme -->", "<!-- end of the demo table -->")


def readme_table(results: Path = RESULTS) -> str:
    return markdown([json.loads(path.read_text()) for path in sorted(results.glob("demo-*.json"))])


def with_readme_table(text: str, table: str) -> str:
    """The README text with the block between the `TABLE` markers replaced by `table`."""
    return between_markers(text, TABLE, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--work-dir", type=Path, help="a new directory: the run starts from nothing")
    parser.add_argument("--set", dest="set_", action="append", default=[], help="SECTION.FIELD=VALUE, as cllm run")
    parser.add_argument("--json", type=Path, help=f"default: benchmarks/results/demo-{cpu_class()}.json")
    parser.add_argument("--report-only", action="store_true", help="print the results file's goals, run nothing")
    parser.add_argument("--readme", action="store_true",
                        help="with --report-only: write the committed results files' table into README.md")
    args = parser.parse_args()
    path = args.json or RESULTS / f"demo-{cpu_class()}.json"
    if args.report_only:
        if args.readme:
            README.write_text(with_readme_table(README.read_text(), readme_table()))
            print(f"wrote the demo table of {README} from {RESULTS}/demo-*.json")
        else:
            print(summary_markdown(json.loads(path.read_text())))
        return
    if args.work_dir is None:
        parser.error("--work-dir is required (a new directory: the run starts from nothing)")
    if args.work_dir.exists():
        parser.error(f"{args.work_dir} exists; the benchmark times a run from nothing: give a new --work-dir")
    if any(item.startswith("tracking.") for item in args.set_):
        parser.error("the benchmark records into the work dir's MLflow store; leave tracking.* unset")

    load_before = os.getloadavg()[0]
    wall, code = time_cllm_run(args.config, args.work_dir, [f"--set={item}" for item in args.set_])
    if code != 0:
        sys.exit(f"error: cllm run exited {code}; its output is in {args.work_dir / 'pipeline.log'}")
    stages = stage_times(args.work_dir)

    work = sum(stage["work_s"] for stage in stages.values())
    outside = wall - sum(stage["wall_s"] for stage in stages.values())
    unfinished = {name: stage["unfinished_tasks"] for name, stage in stages.items() if "unfinished_tasks" in stage}
    if unfinished:
        print(f"task runs the record shows unfinished (their time counts as overhead): {unfinished}")

    table = json.loads((args.work_dir / "eval" / "summary.json").read_text())
    found = figures(table, wall / 60)
    result = {
        "commit": git_commit(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": " ".join(["python -m benchmarks.pipeline", *sys.argv[1:]]), "config": str(args.config),
        "set": args.set_, "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                                  if k in os.environ},
        "wall_s": wall, "work_s": work, "overhead_s": wall - work, "overhead_share": (wall - work) / wall,
        "outside_stages_s": outside, "stages": stages, "cpus": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "figures": found, "goals": verdicts(found), "table": table,
    }
    print("\n" + summary_markdown(result))
    write_json(path, result)


def summary_markdown(result: dict) -> str:
    """One run's stage table, its headline figures and every goal, MET or NOT MET (printed, and on the docs'
    pipeline page for each committed results file)."""
    stages, wall = result["stages"], result["wall_s"]
    lines = ["| stage | wall s | work s | overhead s |", "|---|---|---|---|"]
    for name in sorted(stages, key=lambda name: stages[name]["started"]):  # in the order they ran
        wall_s, work_s = stages[name]["wall_s"], stages[name]["work_s"]
        lines.append(f"| {name} | {wall_s:.1f} | {work_s:.1f} | {wall_s - work_s:.1f} |")
    outside = result["outside_stages_s"]
    lines += [f"| outside the stages (start, imports, Prefect server) | {outside:.1f} | 0.0 | {outside:.1f} |",
              f"| **total** | **{wall:.1f}** | **{result['work_s']:.1f}** | **{result['overhead_s']:.1f}** "
              f"({result['overhead_share']:.1%}) |", ""]
    f = result["figures"]
    lines += [f"{f['minutes']:.1f} minutes end to end, overhead {result['overhead_share']:.1%}; CLLM "
              f"{f['cllm_decoder']} {f['cllm_tokens_per_forward']:.2f} tokens per forward, "
              f"{f['speedup_vs_fastest_ar']:.2f}x the teacher's fastest AR; {result['cpu_capability']} class, commit "
              f"{result['commit'][:7]}, load average {result['load_average_before']:.2f} before, "
              f"{result['load_average_after']:.2f} after; `{result['command']}`", "",
              "| goal | value | | verdict |", "|---|---|---|---|"]
    for name, goal in result["goals"].items():
        lines.append(f"| {name} | {goal['value']:.3f} | {goal['direction']} {goal['goal']} | "
                     f"{'MET' if goal['met'] else '**NOT MET**'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
