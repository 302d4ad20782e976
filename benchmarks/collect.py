"""Trajectory collection speed: the batched, KV-cached collector against the research code's loop.

    python -m benchmarks.collect --model runs/demo/teacher --prompts runs/demo/prompts/train.parquet --limit 64
    python -m benchmarks.collect --tiny --limit 32

Three ways collect the same prompts in one process, chunk by chunk (`--batch-size` prompts), the order rotating
from chunk to chunk, after a warm-up: the collector (rows packed into one sequence over a ragged cache, where the
model's attention is SDPA over plain layers); the collector with the padded forward every other model gets (rows
padded to the widest, holes compacted); and the reference, `reference_jacobi_generate`: batch 1, no KV cache, the
context re-encoded every pass. Both draw each block's random guess the same seeded way and the collector does not
carry a token into the next block, so they visit the same states. Reported: prompts/s and tokens/s of each,
the ratios to the reference, the share of each collector's attention that a row needed (not holes, not
padding), of the tokens it fed that were a row's own (not padding to the widest row), of both weighed by their
multiply-adds (`compute_share`: the useful share of the pass's arithmetic), and how far the
trajectories agree (fixed points, and blocks whose states are identical; a block that ends at EOS differs, since
the collector stops at EOS and the research loop runs the block to its end).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import write_json
from benchmarks.tiny_model import save_tiny_model
from cllm_core import ModelConfig, jacobi_generate, load_model, load_tokenizer, reference_jacobi_generate
from cllm_core.data.collect import read_prompt_table
from cllm_core.data.prompts import encode
from cllm_core.engine import forwards as batch_forwards
from cllm_core.engine.outputs import DecodeStats


def collector(model, ids, mask, args):
    return jacobi_generate(model, ids, mask, n_tokens=args.n_tokens, max_new_tokens=args.max_new_tokens,
                           init="random", seed=list(range(len(ids))), carry=False, eos_token_id=args.eos,
                           return_trajectories=True)


def padded(model, ids, mask, args):
    kept, batch_forwards.PACK = batch_forwards.PACK, False  # the forward models without SDPA over plain layers get
    try:
        return collector(model, ids, mask, args)
    finally:
        batch_forwards.PACK = kept


def reference(model, ids, mask, args):
    outputs = [reference_jacobi_generate(model, ids[i:i + 1], mask[i:i + 1], n_tokens=args.n_tokens,
                                         max_new_tokens=args.max_new_tokens, seed=i, eos_token_id=args.eos,
                                         return_trajectories=True)
               for i in range(len(ids))]
    return [out.trajectories[0] for out in outputs], sum(out.stats.forwards for out in outputs)


WAYS = {"collector": collector, "padded": padded, "reference": reference}
COUNTED = ("attention_slots", "live_attention_slots", "fed_tokens", "live_fed_tokens")
"""The collectors' stats summed over chunks: the shares are of the sums (DecodeStats.live_share, .fed_share)."""


def costs(model) -> tuple[int, int]:
    """Multiply-adds of one fed token through the linear layers (the LM head included) and of one (query, key)
    pair of attention over all layers (scores and weighted values): what weighs the two shares into one."""
    per_token = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return per_token, 2 * config.num_hidden_layers * config.num_attention_heads * head_dim


def compute_share(stats: DecodeStats, per_token: int, per_pair: int) -> float:
    """The share of the multiply-adds of the linear layers and attention together that a row needed."""
    done = stats.fed_tokens * per_token + stats.attention_slots * per_pair
    return (stats.live_fed_tokens * per_token + stats.live_attention_slots * per_pair) / done


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
                        help="weights dtype of every way (the research code ran bfloat16)")
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
        from cllm_core.data.prompts import read_prompts

        texts, chat = read_prompts("data/gsm8k_sample.jsonl", limit=args.limit), False

    warm_ids, warm_mask = encode(tokenizer, texts[:2], chat=chat)
    collector(model, warm_ids, warm_mask, args), reference(model, warm_ids[:1], warm_mask[:1], args)
    names = list(WAYS)
    seconds, forwards = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    counts = {name: dict.fromkeys(COUNTED, 0) for name in names[:2]}
    tokens, blocks, inner = 0, 0, 0
    same = {name: {"fixed": 0, "states": 0, "inner": 0} for name in names[:2]}
    ratios, packing = {name: [] for name in names[:2]}, []
    for chunk, first in enumerate(range(0, len(texts), args.batch_size)):
        ids, mask = encode(tokenizer, texts[first:first + args.batch_size], chat=chat)
        timed, took = {}, {}
        for name in names[chunk % 3:] + names[:chunk % 3]:
            start = time.perf_counter()
            timed[name] = WAYS[name](model, ids, mask, args)
            took[name] = time.perf_counter() - start
            seconds[name] += took[name]
        theirs, forwards["reference"] = timed["reference"][0], forwards["reference"] + timed["reference"][1]
        for name in names[:2]:
            ours = timed[name]
            forwards[name] += ours.stats.forwards
            for key in COUNTED:
                counts[name][key] += getattr(ours.stats, key)
            ratios[name].append(took["reference"] / took[name])
            for mine, other in zip(ours.trajectories, theirs):
                same[name]["fixed"] += [b.fixed_point for b in mine] == [b.fixed_point for b in other]
                same[name]["states"] += sum(a.states == b.states for a, b in zip(mine, other))
                same[name]["inner"] += sum(a.states == b.states for a, b in zip(mine[:-1], other[:-1]))  # not EOS's
        packing.append(took["padded"] / took["collector"])
        for mine in timed["collector"].trajectories:
            tokens += sum(len(b.fixed_point) for b in mine)
            blocks += len(mine)
            inner += len(mine) - 1
        print(f"chunk {chunk}: " + ", ".join(f"{name} {took[name]:.2f}s" for name in names), flush=True)

    n = len(texts)
    result = {"model": "tiny random Llama" if args.tiny else args.model, "dtype": args.dtype, "prompts": n,
              "n_tokens": args.n_tokens, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "tokens": tokens}
    for name in names:
        result[name] = {"seconds": seconds[name], "prompts_per_s": n / seconds[name],
                        "tokens_per_s": tokens / seconds[name], "forwards": forwards[name]}
    summed = {name: dataclasses.replace(DecodeStats.empty(0), **counts[name]) for name in names[:2]}
    for name in names[:2]:
        result[name] |= {
            "live_share": summed[name].live_share, "fed_share": summed[name].fed_share,
            "compute_share": compute_share(summed[name], *costs(model)),
            "speedup": seconds["reference"] / seconds[name], "median_chunk_speedup": statistics.median(ratios[name]),
            "fixed_points_identical": same[name]["fixed"] / n,
            "blocks_with_identical_states": same[name]["states"] / max(blocks, 1),
            "blocks_before_the_last_with_identical_states": same[name]["inner"] / max(inner, 1)}
    result["packing_speedup"] = seconds["padded"] / seconds["collector"]
    result["median_chunk_packing_speedup"] = statistics.median(packing)
    result["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "device": str(model.device),
                             "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(f"\n{n} prompts, {args.dtype}, n_tokens {args.n_tokens}, batch {args.batch_size}, {tokens} tokens; "
          f"reference {result['reference']['prompts_per_s']:.2f} prompts/s")
    for name in names[:2]:
        ours = result[name]
        print(f"{name}: {ours['prompts_per_s']:.2f} prompts/s ({ours['tokens_per_s']:.0f} tok/s), "
              f"{ours['speedup']:.1f}x the reference (median per chunk {ours['median_chunk_speedup']:.1f}x), "
              f"{ours['live_share']:.0%} of its attention live, {ours['fed_share']:.0%} of the tokens fed a row's own, "
              f"{ours['compute_share']:.0%} of its multiply-adds; "
              f"fixed points identical "
              f"{ours['fixed_points_identical']:.0%}, blocks with identical states "
              f"{ours['blocks_with_identical_states']:.0%} (all but each prompt's last: "
              f"{ours['blocks_before_the_last_with_identical_states']:.0%})")
    print(f"packing: the collector at {result['packing_speedup']:.2f}x the padded one "
          f"(median per chunk {result['median_chunk_packing_speedup']:.2f}x)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
