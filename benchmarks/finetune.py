"""Consistency fine-tuning, measured: train loss variants on the same trajectories, then decode the held-out
prompts with each, interleaved prompt by prompt at batch 1 beside the teacher's greedy AR and Jacobi.

    python -m benchmarks.finetune --config configs/demo.yaml --variants gc+ar lc+ar gc --json runs/demo/ft.json

Variants (on top of the profile's `finetune` section): `gc+ar` (global consistency + AR, the paper's), `lc+ar`
(local consistency + AR), `gc` (global consistency only), `profile` (the section as it is, in <work_dir>/cllm
where `cllm train` puts it). The others train into <work_dir>/finetune-bench/<variant>; all are reused when
unchanged. Reported per model: tokens per forward, tokens/s,
wall-clock speedup vs the teacher's AR, exact-answer accuracy, outputs identical to the teacher's, and
repetitive outputs. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table

from cllm_core import ModelConfig, ar_generate, jacobi_generate, load_model, load_tokenizer
from cllm_core.answers import is_correct
from cllm_core.config import load_profile
from cllm_core.finetune import finetune
from cllm_core.prompts import encode
from cllm_core.trajectories import repetitive

VARIANTS = {"gc+ar": {"consistency": "global"}, "lc+ar": {"consistency": "local"},
            "gc": {"consistency": "global", "ar_weight": 0.0}, "profile": {}}


def train_variants(args, profile) -> dict[str, dict]:
    records = {}
    for name in args.variants:
        config = profile.finetune.model_copy(update=VARIANTS[name] | ({"steps": args.steps} if args.steps else {}))
        out = profile.work_dir / ("cllm" if name == "profile" else f"finetune-bench/{name.replace('+', '_')}")
        records[name] = finetune(config, profile.model, str(profile.work_dir / "trajectories"), out, log=print)
    return records


def evaluate(args, profile, records: dict[str, dict]) -> dict:
    prompts = pq.read_table(profile.work_dir / "prompts/eval.parquet").to_pylist()[: args.limit]
    tokenizer = load_tokenizer(profile.model)
    models = {"teacher": load_model(profile.model)}
    models |= {name: load_model(ModelConfig(name_or_path=r["path"])) for name, r in records.items()}
    n, budget = args.n_tokens, args.max_new_tokens
    methods = [("teacher", "ar")] + [(name, "jacobi") for name in models]
    totals = {m: {"tokens": 0, "forwards": 0, "seconds": 0.0, "correct": 0, "same": 0, "repetitive": 0}
              for m in methods}
    for i, prompt in enumerate(prompts):
        ids, mask = encode(tokenizer, [prompt["prompt"]], chat=False)
        outputs = {}
        for m in methods[i % len(methods):] + methods[: i % len(methods)]:  # rotate the order: drift hits all
            model, method = models[m[0]], m[1]
            start = time.perf_counter()
            out = (ar_generate(model, ids, mask, max_new_tokens=budget) if method == "ar"
                   else jacobi_generate(model, ids, mask, n_tokens=n, max_new_tokens=budget))
            seconds = time.perf_counter() - start
            response = out.sequences[0, ids.shape[1]: ids.shape[1] + out.stats.row_new_tokens[0]].tolist()
            outputs[m] = response
            t = totals[m]
            t["tokens"] += len(response)
            t["forwards"] += out.stats.forwards
            t["seconds"] += seconds if i >= args.warmup else 0.0
            t["correct"] += is_correct(tokenizer.decode(response, skip_special_tokens=True), prompt["answer"])
            t["repetitive"] += repetitive(response)
        for m in methods:
            totals[m]["same"] += outputs[m] == outputs[("teacher", "ar")]
    timed = len(prompts) - args.warmup
    base = totals[("teacher", "ar")]
    rows = []
    for (model, method), t in totals.items():
        rows.append({"model": model, "method": method, "tokens_per_forward": t["tokens"] / t["forwards"],
                     "tokens_per_s": t["tokens"] * timed / len(prompts) / t["seconds"],
                     "speedup_vs_teacher_ar": base["seconds"] / t["seconds"], "accuracy": t["correct"] / len(prompts),
                     "same_as_teacher": t["same"], "repetitive": t["repetitive"], "prompts": len(prompts)})
    return {"rows": rows, "training": {name: {"config": r["config"], "metrics": r["metrics"], "reused": r["reused"]}
                                       for name, r in records.items()},
            "n_tokens": n, "max_new_tokens": budget,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads()}}


def print_table(result: dict) -> None:
    table = Table(title=f"held-out prompts, n_tokens {result['n_tokens']}, batch 1")
    for column in ("model", "method", "train s", "tokens/forward", "tokens/s", "speedup vs teacher AR", "accuracy",
                   "same as teacher", "repetitive"):
        table.add_column(column)
    for row in result["rows"]:
        train = result["training"].get(row["model"], {}).get("metrics", {}).get("train_seconds")
        table.add_row(row["model"], row["method"], f"{train:.0f}" if train else "-",
                      f"{row['tokens_per_forward']:.2f}", f"{row['tokens_per_s']:.0f}",
                      f"{row['speedup_vs_teacher_ar']:.2f}x", f"{row['accuracy']:.1%}",
                      f"{row['same_as_teacher']}/{row['prompts']}", str(row["repetitive"]))
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["profile"])
    parser.add_argument("--steps", type=int, help="override the profile's finetune.steps")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5, help="prompts decoded but not timed")
    parser.add_argument("--n-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    profile = load_profile(args.config)
    result = evaluate(args, profile, train_variants(args, profile))
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
