"""Choose a recipe by measurement: the paper's CLLM, Jacobi Forcing, and Jacobi Forcing + a second round, each
decoded by every exact decoder at the block size that is best for it on this CPU, beside the teacher's AR and
prompt lookup, in one interleaved run on the same held-out prompts.

    cllm run --config configs/demo-paper.yaml && cllm run --config configs/demo.yaml
    python -m benchmarks.recipes --json runs/recipes.json

It trains nothing: `--recipe NAME=MODEL_DIR` names the CLLMs (default: the two demo profiles' models), which must
come from one teacher (the root of their `cllm.json` chains). Two steps:

1. Block size. Per recipe, tokens per forward TPF(n) of plain Jacobi on the first `--sweep-prompts` prompts for
   each n of `--n-grid`, and cost(n + 1): the time of one forward of n + 1 tokens over a 1-token forward on a warm
   cache (thread CPU time, the minimum of `--repeats`, block sizes interleaved; the recipes share the teacher's
   architecture, so it is measured once). The recipe decodes at the n that maximises TPF(n) / cost(n + 1).
2. The table. Every prompt is decoded by every (model, method) pair in rotating order after a warm-up
   (`cllm_core.evaluation.evaluate`): tokens per forward, tokens/s, wall-clock speedup against the teacher's AR,
   accuracy, outputs identical to the teacher's AR output and to the model's own AR output, repetition, and the seconds
   its training took (fine-tuning and collection, summed over its rounds, from the records beside the models).

Then the issue's goals against the fastest exact row. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from benchmarks import write_json
from cllm_core import ModelConfig, load_model, load_tokenizer
from cllm_core.data.prompts import encode
from cllm_core.engine.baselines import ar_generate, lookup_generate
from cllm_core.engine.jacobi import jacobi_generate
from cllm_core.evaluation.evaluate import decoders, eval_prompts, evaluate, resolve_check
from cllm_core.evaluation.summary import identical_to, summarize
from cllm_core.runtime.config import EvalConfig, JacobiConfig

RECIPES = {"paper": "runs/demo-paper/cllm", "jf": "runs/demo/cllm", "jf+round2": "runs/demo/cllm-round2"}
METHODS = ["jacobi", "jacobi_lookup", "jacobi_multiblock", "jacobi_recycling"]


def lineage(model_dir: Path) -> tuple[Path, list[dict]]:
    """The teacher at the root of a CLLM's `cllm.json` chain, and each round's record (first round first)."""
    rounds, here = [], model_dir
    while (here / "cllm.json").is_file():
        record = json.loads((here / "cllm.json").read_text())
        rounds.insert(0, record)
        here = Path(record["teacher"]["name_or_path"])
    if not rounds:
        raise SystemExit(f"{model_dir} has no cllm.json: not a CLLM this project trained")
    return here, rounds


def training_seconds(rounds: list[dict]) -> dict[str, float]:
    """Fine-tuning seconds and collection seconds (the shards' own, summed) over a CLLM's rounds."""
    collect = 0.0
    for record in rounds:
        store = Path(record["trajectories"]["store"])
        collect += sum(json.loads(p.read_text()).get("seconds", 0.0) for p in store.glob("shard-*.json"))
    return {"finetune_s": sum(r["metrics"]["train_seconds"] for r in rounds), "collect_s": collect}


def forward_costs(model, ids: torch.Tensor, widths: list[int], repeats: int) -> dict[int, float]:
    """Thread CPU seconds of one forward of q tokens on a warm cache of `ids`, the minimum of `repeats` rounds
    (widths interleaved in each), over the 1-token forward's."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        past = cache.get_seq_length()
        best = {q: float("inf") for q in {1, *widths}}
        for _ in range(repeats):
            for q in best:
                tokens = ids[:, -1:].repeat(1, q)
                positions = torch.arange(past, past + q)[None]
                start = time.thread_time()
                model(input_ids=tokens, position_ids=positions, past_key_values=cache, use_cache=True)
                best[q] = min(best[q], time.thread_time() - start)
                cache.crop(-q)
    return {q: best[q] / best[1] for q in widths}


def sweep(models: dict, tokenizer, prompts: list[dict], chat: bool, grid: list[int], max_new_tokens: int,
          costs: dict[int, float]) -> dict[str, dict]:
    """Per recipe: TPF(n) of plain Jacobi over the prompts, cost(n + 1), their ratio, and the best n."""
    found = {}
    for name, model in models.items():
        rows = []
        for n in grid:
            tokens = forwards = 0
            for prompt in prompts:
                ids, mask = encode(tokenizer, [prompt["prompt"]], "cpu", chat)
                out = jacobi_generate(model, ids, mask, n_tokens=n, max_new_tokens=max_new_tokens)
                tokens, forwards = tokens + out.stats.new_tokens, forwards + out.stats.forwards
            rows.append({"n_tokens": n, "tokens_per_forward": tokens / forwards, "cost": costs[n + 1],
                         "predicted_speedup": tokens / forwards / costs[n + 1]})
        found[name] = {"grid": rows, "best": max(rows, key=lambda r: r["predicted_speedup"])["n_tokens"]}
    return found


def pairs_for(models: dict, best: dict[str, int], args) -> dict:
    """(model, method) -> decoder: the teacher's AR and prompt lookup; each recipe's AR and `--methods` at its n."""
    table = {("teacher", "ar"): partial(ar_generate, max_new_tokens=args.max_new_tokens),
             ("teacher", "lookup"): partial(lookup_generate, max_new_tokens=args.max_new_tokens,
                                            prompt_lookup_num_tokens=args.lookup_tokens)}
    for name in models:
        if name == "teacher":
            continue
        config = EvalConfig(methods=["ar", *args.methods],
                            jacobi=JacobiConfig(n_tokens=best[name], max_new_tokens=args.max_new_tokens))
        table |= {(name, method): decode for method, decode in decoders(config).items()}
    return table


def goals(rows: list[dict]) -> dict:
    """The issue's goals, judged on the fastest exact CLLM row (not prompt lookup, not AR)."""
    teacher = next(r for r in rows if (r["model"], r["method"]) == ("teacher", "ar"))
    lookup = next(r for r in rows if (r["model"], r["method"]) == ("teacher", "lookup"))
    best = max((r for r in rows if r["model"] != "teacher" and r["method"] != "ar"), key=lambda r: r["speedup"])
    return {"row": f"{best['model']} {best['method']} n={best['n_tokens']}",
            "tokens_per_forward >= 4.0": best["tokens_per_forward"] >= 4.0,
            "speedup >= 2.5": best["speedup"] >= 2.5,
            "ahead of prompt lookup": best["speedup"] > lookup["speedup"],
            "accuracy within 1 point of the teacher": best["accuracy"] >= teacher["accuracy"] - 0.01 - 1e-9,
            ">= 99% identical to the teacher": best["same_as_teacher"] >= 0.99,
            "repetition 0%": best["repetition_rate"] == 0.0}


def print_sweep(found: dict) -> None:
    table = Table(title="Block size: TPF(n) of plain Jacobi / cost(n + 1)")
    for column in ["recipe", "n", "tok/forward", "cost(n+1)", "TPF/cost"]:
        table.add_column(column, justify="right")
    for name, entry in found.items():
        for row in entry["grid"]:
            mark = " <" if row["n_tokens"] == entry["best"] else ""
            table.add_row(name, str(row["n_tokens"]), f"{row['tokens_per_forward']:.2f}", f"{row['cost']:.2f}",
                          f"{row['predicted_speedup']:.2f}{mark}")
    Console(width=150).print(table)


def print_rows(rows: list[dict]) -> None:
    table = Table(title="Recipes x decoders (batch 1)")
    for column in ["model", "method", "n", "tok/forward", "tok/s", "speedup", "accuracy", "= teacher",
                   "= own AR", "repetition", "train s", "collect s"]:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["model"], r["method"], str(r["n_tokens"] or "-"), f"{r['tokens_per_forward']:.2f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['accuracy']:.1%}",
                      f"{r['same_as_teacher']:.1%}", f"{r['exact_match']:.1%}", f"{r['repetition_rate']:.1%}",
                      f"{r['finetune_s']:.0f}" if r["finetune_s"] is not None else "-",
                      f"{r['collect_s']:.0f}" if r["collect_s"] is not None else "-")
    Console(width=150).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = " ".join(f"{name}={path}" for name, path in RECIPES.items())
    parser.add_argument("--recipe", action="append", metavar="NAME=MODEL_DIR",
                        help=f"a CLLM to compare (repeatable; default {defaults})")
    parser.add_argument("--prompts", type=Path,
                        help="held-out prompts (default: <teacher's work dir>/prompts/eval.parquet)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--sweep-prompts", type=int, default=40, help="prompts the block-size sweep decodes")
    parser.add_argument("--n-grid", default="8,16,24,32,48,64", help="block sizes the sweep tries")
    parser.add_argument("--n-tokens", type=int, help="skip the sweep: every recipe decodes at this block size")
    parser.add_argument("--repeats", type=int, default=21, help="cost(q): rounds of forwards, the minimum kept")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--lookup-tokens", type=int, default=10, help="the teacher's prompt lookup: tokens proposed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    recipes = dict(item.split("=", 1) for item in args.recipe) if args.recipe else RECIPES
    roots, records = {}, {}
    for name, directory in recipes.items():
        if not Path(directory).is_dir():
            raise SystemExit(f"recipe {name}: {directory} does not exist; train it first (see --help)")
        roots[name], records[name] = lineage(Path(directory))
        if any(record["metrics"].get("stopped_early") for record in records[name]):
            print(f"WARNING: recipe {name}: a round stopped at its max_minutes guard before its last step; its "
                  "figures are of an unfinished schedule")
    if len({root.resolve() for root in roots.values()}) > 1 and len({_weights(r) for r in roots.values()}) > 1:
        raise SystemExit("the recipes come from different teachers (" + ", ".join(
            f"{k}: {v}" for k, v in roots.items()) + "); compare CLLMs of one teacher")
    teacher_dir = next(iter(roots.values()))
    prompts_path = args.prompts or teacher_dir.parent / "prompts/eval.parquet"
    prompts, chat = eval_prompts(prompts_path, args.limit)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(teacher_dir)))
    models = {"teacher": load_model(ModelConfig(name_or_path=str(teacher_dir)))} | {
        name: load_model(ModelConfig(name_or_path=directory)) for name, directory in recipes.items()}
    torch.manual_seed(0)
    print(f"{len(prompts)} prompts from {prompts_path}; teacher {teacher_dir}; CPU {cpu_class()}, "
          f"{torch.get_num_threads()} threads")

    grid = [int(n) for n in args.n_grid.split(",")]
    if args.n_tokens:
        found, best = {}, {name: args.n_tokens for name in recipes}
    else:
        ids, _ = encode(tokenizer, [prompts[0]["prompt"]], "cpu", chat)
        context = ar_generate(models["teacher"], ids, torch.ones_like(ids), max_new_tokens=48).sequences
        costs = forward_costs(models["teacher"], context, [n + 1 for n in grid], args.repeats)
        found = sweep({k: v for k, v in models.items() if k != "teacher"}, tokenizer,
                      prompts[: args.sweep_prompts], chat, grid, args.max_new_tokens, costs)
        print_sweep(found)
        best = {name: entry["best"] for name, entry in found.items()}

    check = resolve_check(EvalConfig(), prompts_path)
    config = EvalConfig(warmup=args.warmup, check=check)
    started = time.perf_counter()
    samples = evaluate(models, tokenizer, prompts, chat, config, log=lambda line: None,
                       pairs=pairs_for(models, best, args))
    same = identical_to(samples, ("teacher", "ar"))
    rows = []
    for row in summarize(samples, ("teacher", "ar")):
        spent = training_seconds(records[row.model]) if row.model in records else {}
        rows.append(row.to_json() | {"n_tokens": best.get(row.model) if row.method not in ("ar", "lookup") else None,
                                     "same_as_teacher": same[row.model, row.method],
                                     "finetune_s": spent.get("finetune_s"), "collect_s": spent.get("collect_s")})
    print_rows(rows)
    verdict = goals(rows)
    print(f"goals on the fastest exact row ({verdict['row']}): " + "; ".join(
        f"{goal} {'met' if ok else 'NOT met'}" for goal, ok in verdict.items() if goal != "row"))
    write_json(args.json, {"cpu": cpu_class(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                           "prompts": len(prompts), "prompts_path": str(prompts_path), "recipes": recipes,
                           "sweep": found, "n_tokens": best, "rows": rows, "goals": verdict,
                           "table_seconds": time.perf_counter() - started})


def _weights(directory: Path) -> str:
    from cllm_core.runtime.identity import file_digest

    return file_digest(directory / "model.safetensors")


def cpu_class() -> str:
    return torch.backends.cpu.get_cpu_capability()


if __name__ == "__main__":
    main()
