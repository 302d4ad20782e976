"""One fine-tuning step (forward, loss, backward, optimizer) on a profile's own model and trajectories, per
objective and precision: seconds, tokens/s, the share of this machine's own matmul peak, minutes per epoch, and
where the step's time goes.

    python -m benchmarks.train_step --config configs/smollm2-gsm8k.yaml --rounds 3 --json runs/train-step.json

Variants, interleaved round by round (round 0 warms up, untimed):
- `cllm`: the paper's objective as the README's first SmolLM2 run trained it (4 blocks x 2 states a step, each
  state in its own prompt + response-prefix context, one AR sequence per block);
- `jacobi_forcing, a response a row`: Jacobi Forcing's packed noisy/clean sequence, one response per batch row
  padded to the longest (how the project first ran it);
- `jacobi_forcing`: the same responses several to a row (`forcing.fit_rows`), as training runs it now;
- with `--compile`, `jacobi_forcing, compiled`: the same under `torch.compile` (`finetune.compile`; its first round,
  the compilation, is reported apart).
Jacobi Forcing steps take the profile's `batch_size` responses (its objective's batch).

Each step's model FLOPs are counted (6 x body weights per real token, 6 x hidden x vocabulary per logit read,
6 x layers x width x length^2 of attention per response) and set against the peak a probe measures here: the
fastest of the model's own matmul shapes in that precision. A profile of one step splits its time into the LM head
(its matmuls), the other matmuls, attention, softmax and loss, the optimizer and the rest; padding is the share of
fed tokens that are padding. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import git_commit, write_json
from cllm_core.data.samples import epoch_size, load_trajectories
from cllm_core.runtime.config import FinetuneConfig, load_profile
from cllm_core.runtime.models import load_model
from cllm_core.runtime.precision import DTYPES, cpu_bf16_slowdown
from cllm_core.training import forcing
from cllm_core.training.batches import PackedBatch, Sampler
from cllm_core.training.objectives import forcing_loss, logits_head, step_loss

CATEGORIES = ("LM head matmuls", "other matmuls", "attention", "softmax and loss", "optimizer", "rest")


def variants(config: FinetuneConfig) -> dict[str, FinetuneConfig]:
    forced = config.model_copy(update={"objective": "jacobi_forcing", "consistency": "global", "ar_labels": "teacher"})
    return {"cllm": config.model_copy(update={"objective": "cllm", "batch_size": 4, "states_per_block": 2}),
            "jacobi_forcing, a response a row": forced, "jacobi_forcing": forced}


def loss_of(lm, batch, config: FinetuneConfig, head):
    if isinstance(batch, PackedBatch):
        return forcing_loss(lm, batch, config, head=head)[0]
    return step_loss(lm, batch, config, reuse_ar=True, head=head)[0]


def batch_of(sampler: Sampler, step: int, one_per_row: bool):
    if not one_per_row:
        return sampler.batch(step)
    packing = forcing.fit_rows
    forcing.fit_rows = lambda lengths: [[i] for i in range(len(lengths))]
    try:
        return sampler.batch(step)
    finally:
        forcing.fit_rows = packing


def step_flops(lm, batch) -> tuple[float, int, int]:
    """(model FLOPs of one training step, real tokens fed, tokens fed with padding)."""
    config = lm.config
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    embedding = lm.get_input_embeddings().weight.numel()
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    body = sum(p.numel() for p in lm.parameters()) - embedding - (0 if tied else embedding)
    if isinstance(batch, PackedBatch):
        real = int((batch.kind != forcing.PADDING).sum())
        lengths = [int((batch.segment[b] == s).sum()) for b in range(len(batch.ids))
                   for s in range(int(batch.segment[b].max()) + 1)]
        logits = int(batch.ar_mask.sum()) + len(batch.pairs)
        fed = batch.tokens
    else:
        columns = torch.arange(batch.ar_mask.shape[1])
        ar_lengths = ((columns * batch.ar_mask).amax(1) + 2).tolist()  # the last label predicts the final token
        lengths = [int(n) for n in ar_lengths + (batch.block_start + batch.block_len).tolist()]
        real = sum(lengths)
        logits = int(batch.ar_mask.sum()) + 2 * int(batch.states.numel())
        width = max(batch.ar_ids.shape[1], batch.state_ids.shape[1])
        fed = (len(batch.ar_ids) + len(batch.state_ids)) * width
    attention = 6 * layers * hidden * sum(length**2 for length in lengths)
    return 6 * body * real + 6 * hidden * vocab * logits + attention, real, fed


def matmul_peak(lm, dtype: torch.dtype, tokens: int = 512, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of the model's own matmul shapes (tokens x in @ in x out) in `dtype`: the best of `repeats`."""
    config = lm.config
    shapes = {"attention projection": (config.hidden_size, config.hidden_size),
              "MLP": (config.hidden_size, config.intermediate_size),
              "LM head": (config.hidden_size, config.vocab_size)}
    peak = {}
    for name, (inner, outer) in shapes.items():
        a, b = torch.randn(tokens, inner, dtype=dtype), torch.randn(inner, outer, dtype=dtype)
        best = math.inf
        for _ in range(repeats + 1):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        peak[name] = 2 * tokens * inner * outer / best / 1e9
    return peak


def profile_step(lm, batch, config: FinetuneConfig, head, dtype: torch.dtype, optimizer) -> dict[str, float]:
    """Seconds of one step by category, from torch's profiler (self time of each op, shapes to tell the head)."""
    from torch.profiler import ProfilerActivity, profile

    vocab = str(lm.config.vocab_size)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run_step(lm, batch, config, head, dtype, optimizer)
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages(group_by_input_shape=True):
        name, self_s = event.key, event.self_cpu_time_total / 1e6
        if name.startswith("Optimizer.") or "adam" in name.lower():
            category = "optimizer"
        elif any(word in name for word in ("mm", "matmul", "linear")):
            category = "LM head matmuls" if vocab in str(event.input_shapes) else "other matmuls"
        elif "scaled_dot_product" in name or "flash_attention" in name:
            category = "attention"
        elif any(word in name for word in ("softmax", "kl_div", "cross_entropy", "nll_loss", "log_softmax")):
            category = "softmax and loss"
        else:
            category = "rest"
        seconds[category] += self_s
    return seconds


def run_step(lm, batch, config: FinetuneConfig, head, dtype: torch.dtype, optimizer) -> dict[str, float]:
    """One step: forward + loss, backward, optimizer; seconds of each phase."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_of(lm, batch, config, head)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"forward and loss": forward - start, "backward": backward - forward,
            "optimizer": time.perf_counter() - backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smollm2-gsm8k.yaml"))
    parser.add_argument("--store", help="trajectory store (default: <work_dir>/trajectories)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"],
                        help="default: fp32, and bf16 where this CPU computes it natively")
    parser.add_argument("--batch-size", type=int, help="Jacobi Forcing's responses a step (default: the profile's)")
    parser.add_argument("--compile", action="store_true", help="also the Jacobi Forcing step under torch.compile")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    profile = load_profile(args.config)
    config = profile.finetune
    if args.batch_size:
        config = config.model_copy(update={"batch_size": args.batch_size})
    data = load_trajectories(args.store or str(profile.work_dir / "trajectories"))
    slowdown = cpu_bf16_slowdown()
    precisions = args.precisions or (["fp32", "bf16"] if slowdown <= 2 else ["fp32"])
    lm = load_model(profile.model.model_copy(update={"device": "cpu"})).train()
    head = logits_head(lm)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-7, betas=(0.9, 0.95))  # tiny steps: the model stays put
    runs = {(name, precision): cfg for name, cfg in variants(config).items() for precision in precisions}
    compiled = None
    if args.compile:
        compiled = copy.deepcopy(lm)
        compiled.compile(dynamic=True)  # in place: the same parameters' names, as finetune.compile does it
        runs |= {("jacobi_forcing, compiled", precision): runs["jacobi_forcing", precision] for precision in precisions}
    first_round: dict[tuple, float] = {}
    compiled_optimizer = torch.optim.AdamW(compiled.parameters(), lr=1e-7, betas=(0.9, 0.95)) if compiled else None
    samplers = {key: Sampler(data, cfg) for key, cfg in runs.items()}
    phases: dict[tuple, list[dict]] = {key: [] for key in runs}
    counts: dict[tuple, list[tuple]] = {key: [] for key in runs}
    for round_ in range(args.rounds + 1):
        for key, cfg in runs.items():
            batch = batch_of(samplers[key], round_ + 1, one_per_row="a row" in key[0])
            model = compiled if "compiled" in key[0] else lm
            timed = run_step(model, batch, cfg, head if model is lm else model.get_output_embeddings(), DTYPES[key[1]],
                             optimizer if model is lm else compiled_optimizer)
            print(f"round {round_} {key[0]}, {key[1]}: {sum(timed.values()):.2f} s", flush=True)
            if not round_:
                first_round[key] = sum(timed.values())
            else:
                phases[key].append(timed)
                counts[key].append(step_flops(lm, batch))
    peaks = {precision: matmul_peak(lm, DTYPES[precision]) for precision in precisions}
    rows = []
    for key, cfg in runs.items():
        seconds = statistics.median(sum(p.values()) for p in phases[key])
        flops, real, fed = (statistics.mean(c[i] for c in counts[key]) for i in range(3))
        per_epoch = math.ceil(epoch_size(data, cfg.objective) / cfg.batch_size)
        peak = max(peaks[key[1]].values())
        rows.append({"variant": key[0], "precision": key[1], "objective": cfg.objective,
                     "batch": f"{cfg.batch_size} responses" if cfg.objective == "jacobi_forcing"
                     else f"{cfg.batch_size} blocks x {cfg.states_per_block} states",
                     "seconds_per_step": seconds,
                     "phases_s": {phase: statistics.median(p[phase] for p in phases[key]) for phase in phases[key][0]},
                     "real_tokens_per_step": real, "fed_tokens_per_step": fed, "padding_share": 1 - real / fed,
                     "tokens_per_s": real / seconds, "tflops": flops / seconds / 1e12,
                     "share_of_peak": flops / seconds / 1e9 / peak, "steps_per_epoch": per_epoch,
                     "minutes_per_epoch": per_epoch * seconds / 60, "first_round_s": first_round[key]})
    best = min((r for r in rows if r["objective"] == "jacobi_forcing" and "a row" not in r["variant"]),
               key=lambda r: r["seconds_per_step"])
    cfg = runs[(best["variant"], best["precision"])]
    breakdown = profile_step(lm, batch_of(Sampler(data, cfg), 1, False), cfg, head, DTYPES[best["precision"]],
                             optimizer)
    commit = git_commit()
    result = {"commit": commit, "command": " ".join(["python -m benchmarks.train_step", *sys.argv[1:]]),
              "config": str(args.config), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "bf16_matmul_slowdown": slowdown, "rounds": args.rounds, "epoch": {
                  "responses": epoch_size(data, "jacobi_forcing"), "blocks": epoch_size(data, "cllm")},
              "matmul_peak_gflops": peaks, "variants": rows,
              "profile": {"variant": best["variant"], "precision": best["precision"], "seconds": breakdown}}
    print_table(result)
    write_json(args.json, result)


def print_table(result: dict) -> None:
    print(f"\nCPU {result['cpu_capability']}; one epoch: {result['epoch']['responses']} responses "
          f"({result['epoch']['blocks']} blocks); matmul peak here (GFLOP/s): "
          + "; ".join(f"{p} " + ", ".join(f"{k} {v:.0f}" for k, v in shapes.items())
                      for p, shapes in result["matmul_peak_gflops"].items()))
    print("| variant | precision | batch | s/step | tokens/step (padding) | tokens/s | share of peak | "
          "min/epoch |\n|---|---|---|---|---|---|---|---|")
    for r in result["variants"]:
        print(f"| {r['variant']} | {r['precision']} | {r['batch']} | {r['seconds_per_step']:.2f} | "
              f"{r['real_tokens_per_step']:,.0f} ({r['padding_share']:.0%}) | {r['tokens_per_s']:,.0f} | "
              f"{r['share_of_peak']:.0%} | {r['minutes_per_epoch']:.1f} |")
    seconds = result["profile"]["seconds"]
    total = sum(seconds.values())
    print(f"\nwhere a step's time goes ({result['profile']['variant']}, {result['profile']['precision']}, profiled): "
          + ", ".join(f"{k} {v / total:.0%}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
