"""A real pretrained model made a CLLM and measured: `cllm run` on a profile (SmolLM2-135M-Instruct on GSM8K by
default), then its budget, the before/after table and the training curve, read back from what the run wrote.

    python -m benchmarks.real_model --config configs/smollm2-gsm8k.yaml --json runs/smollm2-gsm8k/real_model.json

Resumable: rerun the same command after a stop and `cllm run` continues where it was (verified shards are
skipped, training resumes from its last checkpoint, finished stages are reused). `--set` passes through
(e.g. `--set model.device=cuda --set collect.batch_size=64` on a GPU). The figures come from the run's own
records: shard manifests (collection seconds, prompts kept and left out), `cllm.json` (steps, seconds, loss
history), the evaluation's `summary.json` (teacher and CLLM x AR, Jacobi, prompt lookup on the held-out
prompts) and the fine-tuning run's MLflow metrics (Jacobi tokens per forward on held-out prompts by step).
Goals are checked and printed (MET / NOT MET), never asserted: a missed goal is a figure to read.

`--compare WORK_DIR` adds the table of another evaluation of the same models and prompts, e.g. in fp32 where bf16
matmuls are slow (a CPU without AMX; batch 1):

    cllm eval --config configs/smollm2-gsm8k.yaml --work-dir runs/smollm2-gsm8k-fp32 --precision fp32
    (with runs/smollm2-gsm8k-fp32/prompts and /cllm linked to the run's)
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

from benchmarks import write_json
from cllm_core.config import load_profile
from cllm_core.precision import resolve
from cllm_core.records import SummaryRow
from cllm_core.shards import ShardStore

GOALS = {"tokens_per_forward": 2.0, "accuracy_drop_points": 1.0, "speedup": 1.0}


def run_pipeline(config: Path, sets: list[str], log_path: Path) -> tuple[float, int]:
    """`cllm run` in a subprocess, its output passed through and appended to `log_path`."""
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), *[f"--set={s}" for s in sets]]
    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
    return time.perf_counter() - start, process.wait()


def budget(work_dir: Path) -> dict:
    """Prompts, tokens, steps and minutes per stage, from the run's records."""
    ingest = json.loads((work_dir / "prompts/manifest.json").read_text())
    store = ShardStore(str(work_dir / "trajectories"))
    manifests = [store.manifest(shard) for shard in store.shards()]
    cllm = json.loads((work_dir / "cllm/cllm.json").read_text())
    summary = json.loads((work_dir / "eval/summary.json").read_text())
    metrics = cllm["metrics"]
    return {"train_prompts": ingest["train_rows"], "eval_prompts": summary[0]["prompts"],
            "collected_prompts": sum(m["rows"] for m in manifests),
            "left_out_unfinished": sum(m.get("unfinished", 0) for m in manifests),
            "response_tokens": sum(m["tokens"] for m in manifests),
            "max_new_tokens": cllm["trajectories"]["decoding"]["max_new_tokens"], "n_tokens": cllm["n_tokens"],
            "train_blocks": metrics["train_blocks"], "steps": metrics["train_steps"],
            "batch_size": cllm["config"]["batch_size"], "states_per_block": cllm["config"]["states_per_block"],
            "precision": cllm["precision"], "stopped_early": metrics["stopped_early"],
            "minutes": {"collect": sum(m["seconds"] for m in manifests) / 60,
                        "finetune": metrics["train_seconds"] / 60,
                        "evaluate (decoding)": sum(row["seconds"] for row in summary) / 60}}


def curve(work_dir: Path, blocks_per_step: int) -> list[dict]:
    """Per logged step of the last fine-tuning run: loss, fixed-point agreement and (where sampled) Jacobi tokens
    per forward on held-out prompts, from MLflow; with the data it had seen (blocks, `blocks_per_step` a step)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(work_dir / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("cllm")
    runs = client.search_runs([experiment.experiment_id], "tags.`cllm.stage` = 'finetune'",
                              order_by=["attributes.start_time DESC"])
    trained = next((run for run in runs if "sample_tokens_per_forward" in run.data.metrics), None)
    if trained is None:
        return []
    points: dict[int, dict] = {}
    for key, name in (("loss", "loss"), ("agreement", "agreement"), ("sample_tokens_per_forward", "jacobi_tpf")):
        for metric in client.get_metric_history(trained.info.run_id, key):
            if metric.step == 0:  # the run's final figures are logged once more without a step
                continue
            points.setdefault(metric.step, {"step": metric.step, "blocks_seen": metric.step * blocks_per_step}
                              )[name] = metric.value
    return [points[step] for step in sorted(points)]


def evaluation(work_dir: Path) -> tuple[list[SummaryRow], dict, str]:
    """An evaluation's table, its outputs' share identical to the teacher's AR output, and its precision (the
    evaluate run's `cllm.precision` tag in the work dir's MLflow store)."""
    from mlflow.tracking import MlflowClient

    rows = [SummaryRow.from_json(row) for row in json.loads((work_dir / "eval/summary.json").read_text())]
    client = MlflowClient(f"sqlite:///{(work_dir / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("cllm").experiment_id],
                              "tags.`cllm.stage` = 'evaluate'", order_by=["attributes.start_time DESC"])
    precision = runs[0].data.tags.get("cllm.precision", "?") if runs else "?"
    return rows, same_as_teacher(work_dir), precision


def same_as_teacher(work_dir: Path) -> dict[tuple[str, str], float]:
    """Per (model, method): the share of its outputs identical to the teacher's greedy (AR) output."""
    import pyarrow.parquet as pq

    from cllm_core.evaluate import identical_to

    return identical_to(pq.read_table(work_dir / "eval/samples.parquet",
                                      columns=["prompt_id", "model", "method", "response"]).to_pylist())


def verdicts(rows: list[SummaryRow]) -> dict[str, dict]:
    """The issue's goals against the table: CLLM Jacobi tokens per forward, accuracy vs the teacher's AR, speedup."""
    by = {(row.model, row.method): row for row in rows}
    cllm, teacher = by[("cllm", "jacobi")], by[("teacher", "ar")]
    drop = 100 * (teacher.accuracy - cllm.accuracy)
    return {"tokens_per_forward": {"value": cllm.tokens_per_forward, "goal": ">= 2.0",
                                   "met": cllm.tokens_per_forward >= GOALS["tokens_per_forward"]},
            "accuracy_drop_points": {"value": drop, "goal": "<= 1.0", "met": drop <= GOALS["accuracy_drop_points"]},
            "speedup": {"value": cllm.speedup, "goal": "> 1.0", "met": cllm.speedup > GOALS["speedup"]}}


def print_table(rows: list[SummaryRow], same: dict, heading: str) -> None:
    print(f"\n{heading}\n\n| model | method | tokens/forward | tokens/s | speedup vs teacher AR | accuracy | "
          "same as teacher AR | same as own AR |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.model} | {row.method} | {row.tokens_per_forward:.2f} | {row.tokens_per_s:.1f} | "
              f"{row.speedup:.2f}x | {row.accuracy:.1%} | {same[(row.model, row.method)]:.0%} | "
              f"{row.exact_match:.0%} |")


def print_goals(goals: dict, where: str = "") -> None:
    for name, goal in goals.items():
        print(f"{'MET' if goal['met'] else 'NOT MET':8s} {name}: {goal['value']:.2f} (goal {goal['goal']}){where}")


def summary_json(rows: list[SummaryRow], same: dict) -> list[dict]:
    return [row.to_json() | {"same_as_teacher_ar": same[(row.model, row.method)]} for row in rows]


def print_report(spent: dict, rows: list[SummaryRow], same: dict, points: list[dict], goals: dict, cpu: str
                 ) -> None:
    minutes = ", ".join(f"{stage} {value:.1f}" for stage, value in spent["minutes"].items())
    print(f"\nbudget: {spent['train_prompts']} train prompts -> {spent['collected_prompts']} collected "
          f"({spent['left_out_unfinished']} left out: no EOS in {spent['max_new_tokens']} tokens), "
          f"{spent['response_tokens']:,} response tokens, {spent['train_blocks']:,} blocks of {spent['n_tokens']}; "
          f"{spent['steps']} steps of {spent['batch_size']} blocks x {spent['states_per_block']} states; "
          f"minutes: {minutes}; {spent['precision']}, CPU {cpu}")
    print_table(rows, same, f"{spent['eval_prompts']} held-out prompts, batch 1, {spent['precision']}")
    if points:
        print("\n| step | blocks seen (share of the data) | loss | fixed-point agreement | Jacobi tokens/forward "
              "(held-out) |\n|---|---|---|---|---|")
        for point in points:
            if "jacobi_tpf" in point or point["step"] % 40 == 0:
                tpf = f"{point['jacobi_tpf']:.2f}" if "jacobi_tpf" in point else ""
                seen = point["blocks_seen"]
                print(f"| {point['step']} | {seen:,} ({seen / spent['train_blocks']:.0%}) "
                      f"| {point.get('loss', float('nan')):.3f} | {point.get('agreement', float('nan')):.3f} | {tpf} |")
    print()
    print_goals(goals)
    if spent["stopped_early"]:
        print("WARNING  training stopped early at its finetune.max_minutes guard: the CLLM is under-trained")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smollm2-gsm8k.yaml"))
    parser.add_argument("--set", dest="set_", action="append", default=[], help="SECTION.FIELD=VALUE, as cllm run")
    parser.add_argument("--report-only", action="store_true", help="read the finished run's records, run nothing")
    parser.add_argument("--compare", type=Path, metavar="WORK_DIR",
                        help="also report this work dir's evaluation of the same models (e.g. in fp32)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    profile = load_profile(args.config)
    work_dir = profile.work_dir
    for item in args.set_:
        if item.startswith("work_dir="):
            work_dir = Path(item.split("=", 1)[1])
    wall = None
    if not args.report_only:
        wall, code = run_pipeline(args.config, args.set_, work_dir / "real_model.log")
        if code != 0:
            sys.exit(f"error: cllm run exited {code} (output in {work_dir / 'real_model.log'}); rerun this command "
                     "to resume where it stopped")
    rows, same, _ = evaluation(work_dir)
    spent, goals = budget(work_dir), verdicts(rows)
    points = curve(work_dir, spent["batch_size"])
    cpu = os.environ.get("ATEN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    print_report(spent, rows, same, points, goals, cpu)
    compared = None
    if args.compare:
        other, other_same, precision = evaluation(args.compare)
        print_table(other, other_same, f"the same models and prompts evaluated in {precision} ({args.compare})")
        print_goals(verdicts(other), f", {precision}")
        compared = {"work_dir": str(args.compare), "precision": precision, "goals": verdicts(other),
                    "summary": summary_json(other, other_same)}
    write_json(args.json, {"config": str(args.config), "set": args.set_, "wall_s_this_invocation": wall,
                           "cpu": cpu, "precision": resolve(profile.precision, profile.model.device).name,
                           "budget": spent, "curve": points, "summary": summary_json(rows, same),
                           "goals": goals, "compared": compared})


if __name__ == "__main__":
    main()
