"""A real pretrained model made a CLLM and measured against what needs no training: SmolLM2-135M-Instruct on GSM8K
by default, stage by stage (`cllm ingest`, `collect`, `train`), then one interleaved evaluation at batch 1.

    python -m benchmarks.real_model --config configs/smollm2-gsm8k.yaml

Resumable: rerun the same command after a stop; verified shards are skipped, training resumes from its last
checkpoint, finished stages are reused. `--set` passes through to every stage. The evaluation decodes the held-out
prompts, each with every pair in rotating order: the teacher's AR in the precision whose AR step is fastest here
(an AR step is timed in each native precision and recorded; `--all-ar-precisions` decodes each, at a quarter more
time), the teacher with prompt lookup in that precision, and the CLLM's AR, Jacobi and Jacobi with lookup
drafts in fp32 (where Jacobi must equal its own greedy output), at the block size measured fastest for it after
training, plus the CLLM's Jacobi in its measured precision when that is not fp32. Quality: GSM8K accuracy, and what
a worse CLLM lowers where accuracy says nothing: final answers equal to the teacher's, outputs identical to the
teacher's, and the teacher's mean per-token log-likelihood of the outputs (against its own greedy outputs').

It writes `benchmarks/results/real_model-<cpu class>.json` (`--json` elsewhere): the commit, the CPU class, the
command, the budget, the table, the training curve from MLflow and the headline figures the README's table is
made from (`--markdown` prints it). Goals are checked and printed (MET / NOT MET), never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import between_markers, cpu_class, git_commit, write_json
from cllm_core.runtime.config import Profile, read_profile, set_value
from cllm_core.runtime.records import SummaryRow

GOALS = {"cllm_tokens_per_forward": 2.5, "speedup_vs_fastest_ar": 1.5, "speedup_vs_prompt_lookup": 1.2,
         "final_answer_agreement": 0.8, "identical_to_own_ar_fp32": 1.0}
STAGES = ("ingest", "collect", "train")


def run_stages(config: Path, sets: list[str], log_path: Path, teacher: bool = False) -> dict[str, float]:
    """Each stage's command in a subprocess, output passed through and appended to `log_path`; its wall seconds.
    `teacher`: the profile makes its teacher first (`cllm teacher`: a domain teacher, `sft`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for stage in (("teacher",) if teacher else ()) + STAGES:
        command = [sys.executable, "-m", "flows.cli", stage, "--config", str(config), "--no-progress",
                   *[f"--set={s}" for s in sets]]
        if stage == "ingest":
            command.remove("--no-progress")
        start = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
        if process.wait() != 0:
            sys.exit(f"error: cllm {stage} exited {process.returncode} (output in {log_path}); rerun this command "
                     "to resume where it stopped")
        seconds[stage] = time.perf_counter() - start
    return seconds


def evaluate_run(profile, limit: int, all_ar: bool = False) -> tuple[list[SummaryRow], dict]:
    """The interleaved evaluation: pairs as the module says, on the first `limit` held-out prompts at batch 1. The
    teacher's AR is decoded in the precision of the fastest AR step (measured after training, and again here: an AR
    step's time in each precision is recorded), or in every precision with `all_ar`."""
    from functools import partial

    from cllm_core import ModelConfig
    from cllm_core.engine.baselines import ar_generate, lookup_generate
    from cllm_core.engine.jacobi import jacobi_generate
    from cllm_core.evaluation.evaluate import LOOKUP_NGRAM, eval_prompts, evaluate
    from cllm_core.evaluation.summary import summarize
    from cllm_core.evaluation.tuning import forward_seconds
    from cllm_core.runtime.models import load_model, load_tokenizer
    from cllm_core.runtime.precision import DTYPES, measured_choice, resolve

    cllm_dir = profile.work_dir / "cllm"
    choice = measured_choice(str(cllm_dir)) or {}
    trained = json.loads((cllm_dir / "cllm.json").read_text())
    n_tokens = profile.evaluate.jacobi.n_tokens or choice.get("n_tokens") or trained["n_tokens"]
    budget = profile.evaluate.jacobi.max_new_tokens
    native = resolve("auto", profile.model.device).name == "bf16"
    precisions = ["fp32", "bf16"] if native else ["fp32"]
    teacher_config = profile.model
    cllm_config = ModelConfig(name_or_path=str(cllm_dir), device=profile.model.device)
    ar_fastest = choice.get("ar_precision", "fp32")
    decoded = precisions if all_ar else [ar_fastest]
    models = {f"teacher-{p}": load_model(teacher_config, DTYPES[p]) for p in decoded}
    context = round(statistics.fmean(len(ids) for ids in _prompt_ids(profile, limit))) + budget // 2
    ar_steps = {p: forward_seconds(models[f"teacher-{p}"] if p in decoded else load_model(teacher_config, DTYPES[p]),
                                   context, 1) for p in precisions}
    models["cllm"] = load_model(cllm_config, torch.float32)
    if choice.get("precision", "fp32") != "fp32" and choice.get("precision") in precisions:
        models[f"cllm-{choice['precision']}"] = load_model(cllm_config, DTYPES[choice["precision"]])
    ar, jacobi = partial(ar_generate, max_new_tokens=budget), partial(jacobi_generate, n_tokens=n_tokens,
                                                                       max_new_tokens=budget)
    pairs = {(f"teacher-{p}", "ar"): ar for p in decoded}
    pairs[(f"teacher-{ar_fastest}", "lookup")] = partial(lookup_generate, max_new_tokens=budget,
                                                         prompt_lookup_num_tokens=profile.evaluate.lookup_tokens)
    pairs |= {("cllm", "ar"): ar, ("cllm", "jacobi"): jacobi,
              ("cllm", "jacobi_lookup"): partial(jacobi, lookup=LOOKUP_NGRAM, lookup_branch=True)}
    if len(models) > len(decoded) + 1:  # the CLLM in its measured precision, with lookup branches
        pairs[(next(reversed(models)), "jacobi_lookup")] = pairs[("cllm", "jacobi_lookup")]
    prompts, chat = eval_prompts(profile.work_dir / "prompts/eval.parquet", limit)
    config = profile.evaluate.model_copy(update={"check": "math", "batch_size": 1})
    tokenizer = load_tokenizer(teacher_config)
    samples = evaluate(models, tokenizer, prompts, chat, config, pairs=pairs, scorer=f"teacher-{ar_fastest}")
    out = profile.work_dir / "real_model"
    out.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(samples), out / "samples.parquet")
    rows = summarize(samples, (f"teacher-{ar_fastest}", "ar"))
    return rows, {"n_tokens": n_tokens, "choice": choice, "precisions": precisions, "prompts": len(prompts),
                  "max_new_tokens": budget, "ar_step_ms": {p: 1e3 * s for p, s in ar_steps.items()},
                  "ar_decoded_in": decoded}


def _prompt_ids(profile, limit: int) -> list[list[int]]:
    """The held-out prompts' token ids, as the evaluation encodes them."""
    from cllm_core.data.prompts import encode
    from cllm_core.evaluation.evaluate import eval_prompts
    from cllm_core.runtime.models import load_tokenizer

    prompts, chat = eval_prompts(profile.work_dir / "prompts/eval.parquet", limit)
    tokenizer = load_tokenizer(profile.model)
    ids, mask = encode(tokenizer, [p["prompt"] for p in prompts], torch.device("cpu"), chat)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def headline(rows: list[SummaryRow]) -> dict:
    """The figures the goals read: the CLLM's best lossless decoder (fp32 Jacobi or Jacobi with lookup drafts,
    whichever is faster), against the teacher's fastest AR and its prompt lookup, in the same run."""
    by = {(r.model, r.method): r for r in rows}
    fastest_ar = max((r for r in rows if r.model.startswith("teacher") and r.method == "ar"),
                     key=lambda r: r.tokens_per_s)
    lookup = next(r for r in rows if r.model.startswith("teacher") and r.method == "lookup")
    best = max((by["cllm", "jacobi"], by["cllm", "jacobi_lookup"]), key=lambda r: r.tokens_per_s)
    fastest_cllm = max((r for r in rows if r.model.startswith("cllm") and r.method != "ar"),
                       key=lambda r: r.tokens_per_s)
    teacher = fastest_ar
    return {"cllm_best_decoder": f"{best.model} {best.method}", "cllm_tokens_per_forward": best.tokens_per_forward,
            "speedup_vs_fastest_ar": best.tokens_per_s / fastest_ar.tokens_per_s,
            "speedup_vs_prompt_lookup": best.tokens_per_s / lookup.tokens_per_s,
            "fastest_ar": f"{fastest_ar.model} ({fastest_ar.tokens_per_s:.1f} tokens/s)",
            "fastest_cllm_decoder": f"{fastest_cllm.model} {fastest_cllm.method}",
            "fastest_cllm_speedup_vs_fastest_ar": fastest_cllm.tokens_per_s / fastest_ar.tokens_per_s,
            "final_answer_agreement": best.answer_agreement, "identical_to_teacher": best.same_as_baseline,
            "identical_to_own_ar_fp32": min(by["cllm", m].exact_match for m in ("jacobi", "jacobi_lookup")),
            "accuracy": {"teacher": teacher.accuracy, "cllm": best.accuracy},
            "teacher_logprob": {"teacher_greedy": teacher.baseline_logprob, "cllm": best.baseline_logprob}}


def curve(work_dir: Path) -> list[dict]:
    """Per logged step of the last fine-tuning run, from MLflow: data seen (epochs), loss, fixed-point agreement and,
    where sampled, Jacobi tokens per forward on held-out prompts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(work_dir / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("cllm")
    runs = client.search_runs([experiment.experiment_id], "tags.`cllm.stage` = 'finetune'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        return []
    points: dict[int, dict] = {}
    for key in ("epoch", "loss", "agreement", "sample_tokens_per_forward"):
        for metric in client.get_metric_history(runs[0].info.run_id, key):
            if metric.step:  # the run's final figures are logged once more without a step
                points.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    return [points[step] for step in sorted(points)]


def budget(work_dir: Path, wall: dict[str, float], eval_seconds: float, domain_teacher: bool = False) -> dict:
    """Prompts, tokens, steps and minutes per stage, from the run's records; with `domain_teacher` (the profile's
    `sft`), the teacher's fine-tuning and what it bought."""
    from cllm_core.data.shards import ShardStore

    store = ShardStore(str(work_dir / "trajectories"))
    manifests = [store.manifest(shard) for shard in store.shards()]
    cllm = json.loads((work_dir / "cllm/cllm.json").read_text())
    metrics = cllm["metrics"]
    minutes = {"collect": sum(m["seconds"] for m in manifests) / 60, "finetune": metrics["train_seconds"] / 60,
               "evaluate": eval_seconds / 60}
    domain = {}
    if domain_teacher:  # its fine-tuning counts (not its held-out decodes before and after)
        teacher = json.loads((work_dir / "teacher" / "teacher.json").read_text())
        minutes = {"teacher": teacher["metrics"]["train_seconds"] / 60} | minutes
        domain = {"sft": {key: teacher["metrics"][key] for key in ("answers", "train_steps", "epochs", "eval_problems",
                                                                   "eval_accuracy_before", "eval_accuracy")}
                  | {"base": teacher["config"]["model"]["name_or_path"], "lr": teacher["config"]["lr"],
                     "train_precision": teacher["precision"]}}
    return domain | {"collected_prompts": sum(m["rows"] for m in manifests),
            "left_out_unfinished": sum(m.get("unfinished", 0) for m in manifests),
            "response_tokens": sum(m["tokens"] for m in manifests), "n_tokens": cllm["n_tokens"],
            "objective": cllm["config"]["objective"], "epochs": cllm["config"].get("epochs"),
            "steps": metrics["train_steps"], "batch_size": cllm["config"]["batch_size"], "lr": cllm["config"]["lr"],
            "train_precision": cllm["precision"], "stopped_early": metrics["stopped_early"],
            "minutes": minutes, "wall_minutes_this_invocation": {k: v / 60 for k, v in wall.items()}}


def markdown(result: dict) -> str:
    """The README's table, from a results file."""
    lines = [f"{result['prompts']} held-out GSM8K test prompts, batch 1, {result['max_new_tokens']} new tokens; CLLM "
             f"Jacobi at n_tokens {result['n_tokens']}; {result['cpu_capability']} class, 2 cores, commit "
             f"{result['commit'][:7]}; an AR step of the teacher: "
             + ", ".join(f"{ms:.1f} ms in {p}" for p, ms in result["ar_step_ms"].items()) + ":", "",
             "| model | method | precision | tokens/forward | tokens/s | vs fastest AR | accuracy | same final answer "
             "as teacher | same output as teacher | same as own AR | teacher's log-likelihood |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fastest = max(r["tokens_per_s"] for r in result["table"]
                  if r["model"].startswith("teacher") and r["method"] == "ar")
    with_ar = {r["model"] for r in result["table"] if r["method"] == "ar"}  # same-as-own-AR needs its AR decoded
    for r in result["table"]:
        name, _, precision = r["model"].partition("-")
        lines.append(f"| {name} | {r['method']} | {precision or 'fp32'} | {r['tokens_per_forward']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / fastest:.2f}x | {r['accuracy']:.1%} | "
                     f"{r['answer_agreement']:.0%} | {r['same_as_baseline']:.0%} | "
                     f"{format(r['exact_match'], '.0%') if r['method'] != 'ar' and r['model'] in with_ar else '–'} | "
                     f"{r['baseline_logprob']:.3f} |")
    return "\n".join(lines)


README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = ("<!-- real-model tables: python -m benchmarks.real_model --report-only --readme -->",
          "<!-- end of the real-model tables -->")


def readme_tables(results: Path = Path(__file__).resolve().parent / "results") -> str:
    """The README's real-model tables: one per committed results file (a CPU class each), in name order."""
    return "\n\n".join(markdown(json.loads(path.read_text())) for path in sorted(results.glob("real_model-*.json")))


def with_readme_tables(text: str, tables: str) -> str:
    """The README text with the block between the `TABLES` markers replaced by `tables`."""
    return between_markers(text, TABLES, tables)


def verdicts(figures: dict) -> dict:
    return {name: {"value": figures[name], "goal": goal, "met": figures[name] >= goal} for name, goal in GOALS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smollm2-gsm8k.yaml"))
    parser.add_argument("--set", dest="set_", action="append", default=[], help="SECTION.FIELD=VALUE, as cllm run")
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts to evaluate (batch 1)")
    parser.add_argument("--all-ar-precisions", action="store_true",
                        help="decode the teacher's AR in every native precision, not only the fastest AR's")
    parser.add_argument("--report-only", action="store_true", help="print the results file's table, run nothing")
    parser.add_argument("--markdown", action="store_true", help="print the README's table")
    parser.add_argument("--readme", action="store_true",
                        help="with --report-only: write every results file's table into README.md")
    parser.add_argument("--json", type=Path, help=f"default: benchmarks/results/real_model-{cpu_class()}.json")
    args = parser.parse_args()
    path = args.json or Path(f"benchmarks/results/real_model-{cpu_class()}.json")
    if args.report_only and args.readme:
        README.write_text(with_readme_tables(README.read_text(), readme_tables()))
        print(f"wrote the real-model tables of {README} from benchmarks/results/real_model-*.json")
        return
    if args.report_only:
        print(markdown(json.loads(path.read_text())))
        return
    data = read_profile(args.config)
    for item in args.set_:
        set_value(data, item)
    profile = Profile.model_validate(data)
    started = time.perf_counter()
    wall = run_stages(args.config, args.set_, profile.work_dir / "real_model.log", teacher=profile.sft is not None)
    start = time.perf_counter()
    rows, setup = evaluate_run(profile, args.prompts, args.all_ar_precisions)
    eval_seconds = time.perf_counter() - start
    figures = headline(rows)
    spent = budget(profile.work_dir, wall, eval_seconds, domain_teacher=profile.sft is not None)
    commit = git_commit()
    result = {"commit": commit, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "command": " ".join(["python -m benchmarks.real_model", *sys.argv[1:]]), "config": str(args.config),
              "set": args.set_, "prompts": setup["prompts"], "n_tokens": setup["n_tokens"],
              "max_new_tokens": setup["max_new_tokens"], "decoding_choice": setup["choice"],
              "precisions": setup["precisions"], "ar_step_ms": setup["ar_step_ms"],
              "ar_decoded_in": setup["ar_decoded_in"], **figures,
              "run_minutes": sum(spent["minutes"].values()), "budget": spent,
              "wall_minutes_this_invocation": (time.perf_counter() - started) / 60,
              "table": [row.to_json() for row in rows], "curve": curve(profile.work_dir),
              "goals": verdicts(figures),
              "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}
    print(markdown(result))
    for name, goal in result["goals"].items():
        print(f"{'MET' if goal['met'] else 'NOT MET':8s} {name}: {goal['value']:.2f} (goal >= {goal['goal']})")
    if spent["stopped_early"]:
        print("WARNING  training stopped early at its finetune.max_minutes guard: the CLLM is under-trained")
    write_json(path, result)


if __name__ == "__main__":
    main()
