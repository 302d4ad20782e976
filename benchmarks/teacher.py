"""Train demo teachers under one budget and compare held-out accuracy and time, e.g. AdamW against Muon.

    python -m benchmarks.teacher --optimizers muon,adamw --max-minutes 5 --json runs/teacher-bench.json

Each variant trains from scratch into a temporary directory with the demo defaults plus the options given;
runs are sequential (training takes both cores), so quote them with the load average printed beside them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from benchmarks import write_json
from cllm_core.runtime.config import TeacherConfig
from cllm_core.training.teacher import build_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="muon,adamw", help="comma-separated: muon, adamw")
    parser.add_argument("--max-minutes", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=TeacherConfig().steps)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for optimizer in args.optimizers.split(","):
        config = TeacherConfig(optimizer=optimizer, max_minutes=args.max_minutes, steps=args.steps)
        with tempfile.TemporaryDirectory() as directory:
            record = build_teacher(config, Path(directory) / "teacher", log=lambda line: None)
        metrics = record["metrics"]
        results.append({"optimizer": optimizer, "load_average": os.getloadavg()[0], **metrics})
        print(f"{optimizer:6s} accuracy {metrics['eval_accuracy']:6.1%} on {metrics['eval_problems']} held-out, "
              f"{metrics['train_steps']} steps in {metrics['train_seconds']:.0f} s, final loss "
              f"{metrics['train_loss']:.4f}, load {results[-1]['load_average']:.2f}", flush=True)
    write_json(args.json, {"threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()
