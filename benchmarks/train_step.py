"""One fine-tuning step (forward, loss, backward), measured on a profile's own model and trajectories: the
logits computed only where the losses read them (the LM head on a few hundred positions) against the full
(rows, T, vocabulary) logits, optionally with gradient checkpointing, interleaved round by round.

    python -m benchmarks.train_step --config configs/smollm2-gsm8k.yaml --rounds 5 --json runs/train-step.json

Batches are the profile's (batch_size blocks, states_per_block states each), drawn as training draws them,
under the profile's precision (bf16 autocast on a CPU with native bf16 or a GPU). Prints the median seconds
per step of each variant and the ratios to the full-logits step. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks import write_json
from cllm_core.config import load_profile
from cllm_core.finetune import logits_head, step_loss
from cllm_core.models import load_model
from cllm_core.precision import DTYPES, resolve
from cllm_core.samples import Sampler, load_trajectories

VARIANTS = ("full logits", "logits where read", "logits where read + checkpointing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/smollm2-gsm8k.yaml"))
    parser.add_argument("--store", help="trajectory store (default: <work_dir>/trajectories)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    profile = load_profile(args.config)
    config = profile.finetune
    data = load_trajectories(args.store or str(profile.work_dir / "trajectories"))
    lm = load_model(profile.model.model_copy(update={"device": "cpu"})).train()
    precision = resolve(profile.precision, profile.model.device)
    head = logits_head(lm)
    sampler = Sampler(data, config)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds + 1):  # round 0 warms up, untimed
        batch = sampler.batch(round_ + 1)
        for name in VARIANTS:
            if "checkpointing" in name:
                lm.gradient_checkpointing_enable()
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=DTYPES[precision.name], enabled=precision.name != "fp32"):
                loss, _ = step_loss(lm, batch, config, reuse_ar=True, head=None if name == "full logits" else head)
            loss.backward()
            lm.zero_grad(set_to_none=True)
            if round_:
                seconds[name].append(time.perf_counter() - start)
            print(f"round {round_} {name}: {time.perf_counter() - start:.2f} s", flush=True)
            lm.gradient_checkpointing_disable()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    batch = sampler.batch(1)
    rows, width = len(batch.ar_ids) + len(batch.state_ids), max(batch.ar_ids.shape[1], batch.state_ids.shape[1])
    read = int(batch.ar_mask.sum()) + 2 * batch.states.numel()  # AR labels, the states' blocks and their targets
    element = torch.finfo(DTYPES[precision.name]).bits // 8
    result = {"config": str(args.config), "precision": precision.name, "cpu": torch.backends.cpu.get_cpu_capability(),
              "batch_size": config.batch_size, "states_per_block": config.states_per_block,
              "tokens_per_step": batch.tokens, "median_s": medians, "seconds": seconds,
              "logit_positions": {"full": rows * width, "read": read},
              "full_logits_mib": rows * width * lm.config.vocab_size * element / 2**20,
              "ratio_to_full": {name: medians[name] / medians["full logits"] for name in VARIANTS}}
    for name in VARIANTS:
        print(f"{name:36s} {medians[name]:6.2f} s per step (median of {args.rounds}), "
              f"{result['ratio_to_full'][name]:.2f}x the full-logits step")
    print(f"{precision.name}, CPU {result['cpu']}, batch {config.batch_size} blocks x {config.states_per_block} "
          "states; "
          f"logits at {read:,} of {rows * width:,} positions: a {result['full_logits_mib']:.0f} MiB logits tensor "
          "(and its gradient) not made")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
