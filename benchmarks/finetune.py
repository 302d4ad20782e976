"""Consistency fine-tuning, measured: train loss variants on the same trajectories, then decode the held-out
prompts with each (AR and Jacobi) beside the teacher, through the product's evaluation
(`cllm_core.evaluation.evaluate`).

    python -m benchmarks.finetune --config configs/demo.yaml --variants gc+ar lc+ar gc --json runs/demo/ft.json

Variants (on top of the profile's `finetune` section): `gc+ar` (global consistency + AR, the paper's), `lc+ar`
(local consistency + AR), `gc` (global consistency only), `jf` (Jacobi Forcing's packed noisy/clean blocks,
cllm_core/training/forcing.py; `--jf-batch` responses a step), `profile` (the section as it is, in <work_dir>/cllm
where `cllm train` puts it). The others train into <work_dir>/finetune-bench/<variant>; all are reused when
unchanged. Reported per model and method: tokens per forward, tokens/s, wall-clock speedup vs the teacher's
AR, exact-answer accuracy, outputs identical to the teacher's AR output, and the repetition rate. Figures,
not assertions.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table

from benchmarks import write_json
from cllm_core import ModelConfig
from cllm_core.evaluation.evaluate import run_evaluation
from cllm_core.runtime.config import EvalConfig, JacobiConfig, load_profile
from cllm_core.training.finetune import finetune

VARIANTS = {"gc+ar": {"consistency": "global"}, "lc+ar": {"consistency": "local"},
            "gc": {"consistency": "global", "ar_weight": 0.0}, "profile": {},
            "jf": {"objective": "jacobi_forcing"}}


def train_variants(args, profile) -> dict[str, dict]:
    records = {}
    for name in args.variants:
        update = VARIANTS[name] | ({"steps": args.steps} if args.steps else {})
        if name == "jf":
            update |= {"batch_size": args.jf_batch or profile.finetune.batch_size, "noise_window": args.noise_window}
        config = type(profile.finetune)(**profile.finetune.model_dump() | update)  # validated
        out = profile.work_dir / ("cllm" if name == "profile" else f"finetune-bench/{name.replace('+', '_')}")
        records[name] = finetune(config, profile.model, str(profile.work_dir / "trajectories"), out, log=print)
    return records


def evaluate(args, profile, records: dict[str, dict]) -> dict:
    """The product's evaluation (cllm_core.evaluation.evaluate) of the teacher and every variant with `--methods`,
    plus how many of each pair's outputs equal the teacher's AR output."""
    config = EvalConfig(methods=args.methods, limit=args.limit, warmup=args.warmup,
                        jacobi=JacobiConfig(n_tokens=args.n_tokens, max_new_tokens=args.max_new_tokens))
    models = {"teacher": profile.model} | {name: ModelConfig(name_or_path=r.path) for name, r in records.items()}
    result = run_evaluation(config, models, profile.work_dir / "prompts/eval.parquet",
                            profile.work_dir / "finetune-bench/eval", log=lambda line: None)
    samples = pq.read_table(result.samples).to_pylist()
    teacher = {r["prompt_id"]: r["response"] for r in samples if (r["model"], r["method"]) == ("teacher", "ar")}
    rows = [row.to_json() for row in result.summary]
    for row in rows:
        row["same_as_teacher"] = sum(r["response"] == teacher[r["prompt_id"]] for r in samples
                                     if (r["model"], r["method"]) == (row["model"], row["method"]))
    return {"rows": rows, "n_tokens": args.n_tokens, "max_new_tokens": args.max_new_tokens,
            "training": {name: {"config": r.config, "metrics": r.metrics, "reused": r.reused}
                         for name, r in records.items()},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads()}}


def print_table(result: dict) -> None:
    table = Table(title=f"held-out prompts, n_tokens {result['n_tokens']}, batch 1")
    for column in ("model", "method", "train s", "tokens/forward", "tokens/s", "speedup vs teacher AR", "accuracy",
                   "same as teacher", "repetition"):
        table.add_column(column)
    for row in result["rows"]:
        train = result["training"].get(row["model"], {}).get("metrics", {}).get("train_seconds")
        table.add_row(row["model"], row["method"], f"{train:.0f}" if train else "-",
                      f"{row['tokens_per_forward']:.2f}", f"{row['tokens_per_s']:.0f}", f"{row['speedup']:.2f}x",
                      f"{row['accuracy']:.1%}", f"{row['same_as_teacher']}/{row['prompts']}",
                      f"{row['repetition_rate']:.0%}")
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["profile"])
    parser.add_argument("--steps", type=int, help="override the profile's finetune.steps")
    parser.add_argument("--jf-batch", type=int, help="jf: responses a step (default: the profile's batch_size)")
    parser.add_argument("--noise-window", type=int, default=16, help="jf: blocks over which the noise rises")
    parser.add_argument("--methods", nargs="+", default=["ar", "jacobi"],
                        choices=["ar", "jacobi", "lookup", "jacobi_lookup", "jacobi_multiblock", "jacobi_recycling"])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up decodes per model and method")
    parser.add_argument("--n-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    profile = load_profile(args.config)
    result = evaluate(args, profile, train_variants(args, profile))
    print_table(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
