"""Fine-tuning memory, measured: full fine-tuning with logits only where the losses read them (the default), the
same with the whole (rows, T, vocabulary) logits tensor, and LoRA adapters at a few ranks, on the same trajectories;
each trained in its own process (peak memory is a process's), then decoded together on the held-out prompts.

    python -m benchmarks.memory --config configs/demo.yaml --json runs/memory.json

Per variant: step time (median over the logged windows), peak resident set size of the training process and
its rise over the process after setup (model, data and optimizer built, before the first step), trainable
parameters, then tokens per forward and accuracy of the saved CLLM (Jacobi at the profile's evaluation block size,
batch 1). On a GPU the peak is `torch.cuda.max_memory_allocated`. Figures, not assertions. Models go to
<work_dir>/memory-bench/<variant>; a rerun retrains.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import write_json
from cllm_core import ModelConfig
from cllm_core.evaluation.evaluate import run_evaluation
from cllm_core.runtime.config import EvalConfig, FinetuneConfig, Profile, read_profile

VARIANTS = {
    "logits where read": {},
    "whole logits": {},  # the same config, the head path switched off (see train_one)
    "LoRA r8": {"lora": {"rank": 8, "alpha": 16}},
    "LoRA r32": {"lora": {"rank": 32, "alpha": 64}},
}
LORA_LR_FACTOR = 5  # adapters start at zero and move a few parameters: the usual LoRA practice of a larger rate


def profile_at(path: Path, work_dir: Path | None) -> Profile:
    """The profile, read with another work dir where given (its teacher, prompts and trajectories)."""
    return Profile.model_validate(read_profile(path) | ({"work_dir": str(work_dir)} if work_dir else {}))


def train_one(profile: Profile, variant: str, out: Path, steps: int | None) -> dict:
    """One variant in this process: prepare, train, publish; memory and step times."""
    from cllm_core.training.loop import fit
    from cllm_core.training.publish import publish
    from cllm_core.training.setup import prepare

    update = dict(VARIANTS[variant]) | ({"steps": steps} if steps else {}) | {"registered_model": None,
                                                                              "sample_prompts": 0}
    if "lora" in update:
        update["lr"] = profile.finetune.lr * LORA_LR_FACTOR
    config = FinetuneConfig(**profile.finetune.model_dump() | update)
    run = prepare(config, profile.model, str(profile.work_dir / "trajectories"), out, None, profile.precision, print)
    if variant == "whole logits":
        run.head = None
    cuda = run.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    after_setup = _rss_mb()
    trainable = sum(p.numel() for p in run.lm.parameters() if p.requires_grad)  # before the adapters are merged
    metrics = fit(run, ([], False), lambda line: None, print, None, None, None)
    publish(run, metrics, lambda line: None)
    windows = [h["tokens_per_s"] for h in run.history]
    return {"variant": variant, "trainable": trainable,
            "train_s": metrics["train_seconds"], "steps": metrics["train_steps"],
            "step_s": metrics["train_seconds"] / metrics["train_steps"],
            "median_tokens_per_s": statistics.median(windows), "rss_after_setup_mb": after_setup,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, "lr": config.lr,
            "path": str(out)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="override the profile's finetune.steps")
    parser.add_argument("--work-dir", type=Path, help="another work dir holding the profile's teacher, prompts and "
                        "trajectories (e.g. runs/demo-paper)")
    parser.add_argument("--limit", type=int, default=200, help="held-out prompts decoded")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: train this variant, print its JSON
    args = parser.parse_args()
    profile = profile_at(args.config, args.work_dir)
    root = profile.work_dir / "memory-bench"
    if args.one:
        out = root / args.one.replace(" ", "-")
        print("RESULT " + json.dumps(train_one(profile, args.one, out, args.steps)))
        return
    if not (profile.work_dir / "trajectories").is_dir():
        raise SystemExit(f"no trajectories in {profile.work_dir}: run `cllm run --config {args.config}` first")
    trained = []
    for variant in args.variants:  # one process each: a process's peak memory is its own
        command = [sys.executable, "-m", "benchmarks.memory", "--config", str(args.config), "--one", variant]
        command += (["--steps", str(args.steps)] if args.steps else []) + (
            ["--work-dir", str(args.work_dir)] if args.work_dir else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{variant}: training failed:\n{done.stderr[-2000:]}")
        result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(f"{variant}: {result['train_s']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
              f"(+{result['peak_rss_mb'] - result['rss_after_setup_mb']:.0f} over setup)")
        trained.append(result)
    config = EvalConfig(**profile.evaluate.model_dump() | {"methods": ["ar", "jacobi"], "limit": args.limit})
    models = {"teacher": profile.model} | {r["variant"]: ModelConfig(name_or_path=r["path"]) for r in trained}
    evaluation = run_evaluation(config, models, profile.work_dir / "prompts/eval.parquet", root / "eval",
                                log=lambda line: None)
    quality = {(row.model, row.method): row for row in evaluation.summary}
    rows = []
    for r in trained:
        jacobi, ar = quality[r["variant"], "jacobi"], quality[r["variant"], "ar"]
        rows.append(r | {"tokens_per_forward": jacobi.tokens_per_forward, "accuracy": jacobi.accuracy,
                         "speedup": jacobi.speedup, "ar_accuracy": ar.accuracy})
    teacher = quality["teacher", "ar"]
    print(f"| variant | trainable | lr | step s | peak RSS MB (+ over setup) | tokens/forward | speedup | accuracy "
          f"(teacher {teacher.accuracy:.1%}) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['lr']:g} | {r['step_s']:.3f} | {r['peak_rss_mb']:.0f} "
              f"(+{r['peak_rss_mb'] - r['rss_after_setup_mb']:.0f}) | {r['tokens_per_forward']:.2f} | "
              f"{r['speedup']:.2f}x | {r['accuracy']:.1%} |")
    write_json(args.json, {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                           "platform": platform.platform(), "config": str(args.config), "rows": rows,
                           "teacher_accuracy": teacher.accuracy})


if __name__ == "__main__":
    main()
