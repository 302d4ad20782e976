"""Trajectory collection speed: the batched, KV-cached collector against the research code's loop.

    python -m benchmarks.collect --model runs/demo/teacher --prompts runs/demo/prompts/train.parquet --limit 64
    python -m benchmarks.collect --tiny --limit 32

Both collect the same prompts in one process, chunk by chunk (`--batch-size` prompts), alternating which runs
first, after a warm-up. The reference is `reference_jacobi_generate`: batch 1, no KV cache, the context
re-encoded every pass. Both draw each block's random guess the same seeded way and the collector does not
carry a token into the next block, so they visit the same states. Reported: prompts/s and tokens/s of each,
their ratio, and how far the trajectories agree (fixed points, and blocks whose states are identical; a block
that ends at EOS differs, since the collector stops at EOS and the research loop runs the block to its end).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import write_json
from benchmarks.tiny_model import save_tiny_model
from cllm_core import ModelConfig, jacobi_generate, load_model, load_tokenizer, reference_jacobi_generate
from cllm_core.collect import read_prompt_table
from cllm_core.prompts import encode


def collector(model, ids, mask, args):
    return jacobi_generate(model, ids, mask, n_tokens=args.n_tokens, max_new_tokens=args.max_new_tokens,
                           init="random", seed=list(range(len(ids))), carry=False, eos_token_id=args.eos,
                           return_trajectories=True)


def reference(model, ids, mask, args):
    outputs = [reference_jacobi_generate(model, ids[i:i + 1], mask[i:i + 1], n_tokens=args.n_tokens,
                                         max_new_tokens=args.max_new_tokens, seed=i, eos_token_id=args.eos,
                                         return_trajectories=True)
               for i in range(len(ids))]
    return [out.trajectories[0] for out in outputs], sum(out.stats.forwards for out in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="teacher: hub id or model directory")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --model")
    parser.add_argument("--prompts", help="prompts Parquet from `cllm ingest` (default: GSM8K sample questions)")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights dtype of both loops (the research code ran bfloat16)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.eos = [] if args.tiny else None  # a random model's EOS is noise: let it run to max_new_tokens
    if not args.tiny and not args.model:
        parser.error("give --model DIR or --tiny")

    with tempfile.TemporaryDirectory() as scratch:
        path = save_tiny_model(Path(scratch) / "tiny") if args.tiny else args.model
        config = ModelConfig(name_or_path=str(path))
        model, tokenizer = load_model(config, getattr(torch, args.dtype)), load_tokenizer(config)
    if args.prompts:
        table, chat = read_prompt_table(args.prompts, args.limit)
        texts = table.column("prompt").to_pylist()
    else:
        from cllm_core.prompts import read_prompts

        texts, chat = read_prompts("data/gsm8k_sample.jsonl", limit=args.limit), False

    warm_ids, warm_mask = encode(tokenizer, texts[:2], chat=chat)
    collector(model, warm_ids, warm_mask, args), reference(model, warm_ids[:1], warm_mask[:1], args)
    seconds = {"collector": 0.0, "reference": 0.0}
    forwards = {"collector": 0, "reference": 0}
    tokens, fixed_same, states_same, blocks, inner_same, inner = 0, 0, 0, 0, 0, 0
    ratios = []
    for chunk, first in enumerate(range(0, len(texts), args.batch_size)):
        ids, mask = encode(tokenizer, texts[first:first + args.batch_size], chat=chat)
        timed = {}
        for name in (["collector", "reference"] if chunk % 2 == 0 else ["reference", "collector"]):
            start = time.perf_counter()
            run = collector if name == "collector" else reference
            timed[name] = run(model, ids, mask, args)
            seconds[name] += (elapsed := time.perf_counter() - start)
            timed[name + "_s"] = elapsed
        ours, (theirs, reference_forwards) = timed["collector"], timed["reference"]
        forwards["collector"] += ours.stats.forwards
        forwards["reference"] += reference_forwards
        ratios.append(timed["reference_s"] / timed["collector_s"])
        for mine, other in zip(ours.trajectories, theirs):
            tokens += sum(len(b.fixed_point) for b in mine)
            blocks += len(mine)
            fixed_same += [b.fixed_point for b in mine] == [b.fixed_point for b in other]
            states_same += sum(a.states == b.states for a, b in zip(mine, other))
            inner_same += sum(a.states == b.states for a, b in zip(mine[:-1], other[:-1]))  # all but the EOS block
            inner += len(mine) - 1
        print(f"chunk {chunk}: collector {timed['collector_s']:.2f}s, reference {timed['reference_s']:.2f}s",
              flush=True)

    n = len(texts)
    result = {
        "model": "tiny random Llama" if args.tiny else args.model, "dtype": args.dtype, "prompts": n,
        "n_tokens": args.n_tokens,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "tokens": tokens,
        "collector": {"seconds": seconds["collector"], "prompts_per_s": n / seconds["collector"],
                      "tokens_per_s": tokens / seconds["collector"], "forwards": forwards["collector"]},
        "reference": {"seconds": seconds["reference"], "prompts_per_s": n / seconds["reference"],
                      "tokens_per_s": tokens / seconds["reference"], "forwards": forwards["reference"]},
        "speedup": seconds["reference"] / seconds["collector"], "median_chunk_speedup": statistics.median(ratios),
        "fixed_points_identical": fixed_same / n, "blocks_with_identical_states": states_same / max(blocks, 1),
        "blocks_before_the_last_with_identical_states": inner_same / max(inner, 1),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "device": str(model.device)},
    }
    ours, theirs = result["collector"], result["reference"]
    print(f"\n{n} prompts, {args.dtype}, n_tokens {args.n_tokens}, {tokens} tokens: "
          f"collector {ours['prompts_per_s']:.2f} prompts/s "
          f"({ours['tokens_per_s']:.0f} tok/s), reference {theirs['prompts_per_s']:.2f} prompts/s "
          f"({theirs['tokens_per_s']:.0f} tok/s): {result['speedup']:.1f}x (median per chunk "
          f"{result['median_chunk_speedup']:.1f}x); fixed points identical {result['fixed_points_identical']:.0%}, "
          f"blocks with identical states {result['blocks_with_identical_states']:.0%} (all but each prompt's last: "
          f"{result['blocks_before_the_last_with_identical_states']:.0%})")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
