"""Decoding benchmark: AR greedy vs Jacobi vs prompt lookup (optionally the reference loop) on the same
prompts, in one process, warmed up, interleaved prompt by prompt in rotating order. Batch 1.

    python -m benchmarks.decoding --model ID_OR_DIR [--gguf-file F] --prompts FILE --limit N \
        --n-tokens 16 --max-new-tokens 128 --json OUT

Prints a table (tokens per forward, tokens/s, speedup vs AR, exact match vs AR) and writes the same
fields as JSON, with the per-prompt records and the environment. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from benchmarks import write_json
from cllm_core import (
    ModelConfig,
    ar_generate,
    jacobi_generate,
    load_model,
    load_tokenizer,
    lookup_generate,
    reference_jacobi_generate,
)
from cllm_core.data.prompts import encode, read_prompts, render
from cllm_core.data.trajectories import repetitive

METHODS = ("ar", "jacobi", "lookup", "reference")


def decoders(args) -> dict:
    common = {"max_new_tokens": args.max_new_tokens}
    table = {
        "ar": partial(ar_generate, **common),
        "jacobi": partial(jacobi_generate, n_tokens=args.n_tokens, init=args.init, **common),
        "lookup": partial(lookup_generate, prompt_lookup_num_tokens=args.lookup_tokens, **common),
        "reference": partial(reference_jacobi_generate, n_tokens=args.n_tokens, **common),
    }
    return {name: table[name] for name in args.methods}


def timed(decode, model, ids, mask, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = decode(model, ids, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig(name_or_path=args.model, gguf_file=args.gguf_file, device=args.device)
    model, tokenizer = load_model(config, getattr(torch, args.dtype)), load_tokenizer(config)
    device = next(model.parameters()).device
    texts = [render(tokenizer, p, chat=not args.no_chat) for p in read_prompts(args.prompts, args.field, args.limit)]
    methods = decoders(args)
    names = list(methods)

    ids, mask = encode(tokenizer, texts[:1], device, chat=not args.no_chat)
    for decode in methods.values():  # warm-up: kernels, allocator, caches
        decode(model, ids, mask, max_new_tokens=min(16, args.max_new_tokens))

    records = []
    for i, text in enumerate(texts):
        ids, mask = encode(tokenizer, [text], device, chat=not args.no_chat)
        record = {"prompt": i, "prompt_tokens": ids.shape[1]}
        order = names[i % len(names):] + names[: i % len(names)]  # rotate so no method always runs first
        for name in order:
            seconds, out = timed(methods[name], model, ids, mask, device)
            record[name] = {"seconds": seconds, "new_tokens": out.stats.new_tokens, "forwards": out.stats.forwards,
                            "fast_forward": out.stats.fast_forward, "stationary": out.stats.stationary,
                            "tokens": out.sequences[0, ids.shape[1]:].tolist()}
        record["repetitive"] = repetitive(record[names[0]]["tokens"])
        records.append(record)
        print(f"prompt {i + 1}/{len(texts)}: " + ", ".join(
            f"{n} {record[n]['new_tokens']} tok in {record[n]['seconds']:.2f}s" for n in names), file=sys.stderr)
    return {"config": vars(args) | {"methods": names}, "environment": environment(device),
            "methods": summarise(records, names), "per_prompt": records}


def summarise(records: list[dict], names: list[str]) -> list[dict]:
    baseline = "ar" if "ar" in names else names[0]
    rows = []
    for name in names:
        runs = [r[name] for r in records]
        tokens, seconds = sum(x["new_tokens"] for x in runs), sum(x["seconds"] for x in runs)
        speed = tokens / seconds
        base = [r[baseline] for r in records]
        base_speed = sum(x["new_tokens"] for x in base) / sum(x["seconds"] for x in base)
        ratios = [(x["new_tokens"] / x["seconds"]) / (b["new_tokens"] / b["seconds"]) for x, b in zip(runs, base)]
        rows.append({
            "method": name,
            "tokens_per_forward": tokens / sum(x["forwards"] for x in runs),
            "tokens_per_s": speed,
            "speedup_vs_ar": speed / base_speed,
            "median_speedup_vs_ar": statistics.median(ratios),
            "exact_match_vs_ar": sum(x["tokens"] == b["tokens"] for x, b in zip(runs, base)) / len(runs),
            "new_tokens": tokens,
            "forwards": sum(x["forwards"] for x in runs),
            "seconds": seconds,
            "fast_forward": sum(x["fast_forward"] for x in runs),
            "stationary": sum(x["stationary"] for x in runs),
            "repetitive_prompts": sum(r["repetitive"] for r in records),
        })
    return rows


def environment(device: torch.device) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def print_table(result: dict) -> None:
    table = Table(title=f"decoding: {result['config']['model']}, {len(result['per_prompt'])} prompts, "
                        f"n_tokens {result['config']['n_tokens']}, max_new_tokens {result['config']['max_new_tokens']}")
    for column in ("method", "tokens/forward", "tokens/s", "speedup vs AR", "median speedup",
                   "exact match vs AR", "fast-forward", "stationary"):  # as in the JSON
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in result["methods"]:
        table.add_row(row["method"], f"{row['tokens_per_forward']:.3f}", f"{row['tokens_per_s']:.1f}",
                      f"{row['speedup_vs_ar']:.2f}x", f"{row['median_speedup_vs_ar']:.2f}x",
                      f"{row['exact_match_vs_ar']:.0%}", str(row["fast_forward"]), str(row["stationary"]))
    console = Console(width=160)
    console.print(table)
    console.print(f"prompts whose AR output repeats degenerately: {result['methods'][0]['repetitive_prompts']}; "
                  f"environment: {result['environment']}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub id, model directory, .gguf file or package:NAME")
    parser.add_argument("--gguf-file", help="GGUF file inside --model")
    parser.add_argument("--prompts", required=True, help=".jsonl or .parquet (field --field) or .txt (one per line)")
    parser.add_argument("--field", default="question", help="field or column holding the prompt")
    parser.add_argument("--limit", type=int, default=20, help="first N prompts")
    parser.add_argument("--n-tokens", type=int, default=16, help="Jacobi block size")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default="ar,jacobi,lookup", help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument("--init", default="repeat", choices=["repeat", "random"], help="Jacobi initial guess")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        result = run(args)
    except (FileNotFoundError, KeyError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print_table(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
