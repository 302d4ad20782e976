"""The demo's quality goals on many more held-out prompts than the demo evaluates: a finished run's teacher and CLLM.

    python -m benchmarks.held_out --run-dir runs/demo --prompts 2000

The demo evaluates 200 held-out prompts, where one prompt is half a point of every share. This ingests the first
`--prompts` of the same held-out stream (the demo's 200 are its first 200, which is checked), decodes each at batch
1 with the teacher's AR, the CLLM's AR and the CLLM's Jacobi (interleaved, in the profile's precision and block
size), and prints the goals of `benchmarks/pipeline.py` that concern quality and speed, MET or NOT MET, for all the
prompts and again for the demo's 200. It writes `benchmarks/results/demo_held_out-<cpu class>.json` (`--json`
elsewhere).

It also measures what the model's forward alone makes of the wall share (an AR token's time over a Jacobi pass's):
the time in the CLLM's forward calls per greedy AR token over that per Jacobi pass, beside the whole wall share of the
same decodes (the first 200 prompts, the CLLM's own AR and Jacobi interleaved per prompt, so one stretch of the
machine's speed measures both). Their difference is the decoding loop's own cost; the forward-only share is what a
loop that cost nothing would reach. A pass feeds several tokens where a step feeds one, so only a pass's forward as
cheap as a step's would reach 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks import cpu_class, git_commit, write_json
from benchmarks.pipeline import GOALS, figures, verdicts
from cllm_core.data.ingest import ingest
from cllm_core.engine.jacobi import greedy_generate, jacobi_generate
from cllm_core.evaluation.evaluate import eval_prompts, evaluate, resolve_check
from cllm_core.evaluation.summary import summarize
from cllm_core.runtime.config import ModelConfig
from cllm_core.runtime.config.parsing import load_profile
from cllm_core.runtime.models import load_model, load_tokenizer
from cllm_core.runtime.precision import DTYPES, resolve

QUALITY = {name: goal for name, goal in GOALS.items() if name != "minutes"}  # what a finished run's models decide
PAIRS = (("teacher", "ar"), ("cllm", "ar"), ("cllm", "jacobi"))  # the headline's pairs and the CLLM's own AR


def held_out_prompts(profile, teacher: ModelConfig, count: int, out_dir: Path, run_prompts: Path) -> Path:
    """The first `count` held-out prompts of the profile's source, ingested into `out_dir`; the run's own eval
    prompts must be their first ones (else the run came from other inputs)."""
    config = profile.ingest.model_copy(update={"max_eval": count})
    ingest(config, teacher, out_dir, log=lambda line: None)
    ours, theirs = (pq.read_table(path, columns=["prompt_id"]).column("prompt_id").to_pylist()
                    for path in (out_dir / "eval.parquet", run_prompts))
    if ours[: len(theirs)] != theirs:
        sys.exit(f"error: {run_prompts} is not the start of the held-out prompts that {profile.ingest.source} "
                 "gives with this profile; pass the --config the run was made with")
    return out_dir / "eval.parquet"


def quality(samples: list[dict], ids: set[str] | None = None) -> dict:
    """The figures of `benchmarks.pipeline.figures` (but minutes) over the samples of the prompts `ids` (None: all)."""
    table = [row.to_json() for row in summarize([s for s in samples if ids is None or s["prompt_id"] in ids])]
    found = figures(table, minutes=0.0)
    found.pop("minutes")
    return found | {"prompts": len({s["prompt_id"] for s in samples if ids is None or s["prompt_id"] in ids})}


def forward_share(cllm, tokenizer, prompts: list[dict], chat: bool, decoders: dict) -> dict:
    """The wall share with the decoding loop's own cost taken out: seconds in the CLLM's forward calls per greedy AR
    token over those per Jacobi pass, both decoding `prompts` at batch 1 (`decoders`: "ar" and "jacobi", as the
    evaluation ran them), interleaved per prompt; beside it the whole wall share of the same decodes."""
    from cllm_core.data.prompts import encode

    calls: list[float] = []
    started = cllm.register_forward_pre_hook(lambda module, args: calls.append(-time.perf_counter()))
    ended = cllm.register_forward_hook(lambda module, args, output: calls.append(time.perf_counter()))
    forward = {"ar": 0.0, "jacobi": 0.0}  # seconds in the forward calls
    wall = {"ar": 0.0, "jacobi": 0.0}  # seconds of the whole decodes
    counts = {"ar": 0, "jacobi": 0}  # AR tokens; Jacobi passes
    try:
        for prompt in prompts:
            ids, mask = encode(tokenizer, [prompt["prompt"]], "cpu", chat)
            for method in ("ar", "jacobi"):
                calls.clear()
                start = time.perf_counter()
                out = decoders[method](cllm, ids, mask)
                wall[method] += time.perf_counter() - start
                forward[method] += sum(calls)
                counts[method] += out.stats.new_tokens if method == "ar" else out.stats.forwards
    finally:
        started.remove()
        ended.remove()
    token, passing = forward["ar"] / counts["ar"], forward["jacobi"] / counts["jacobi"]
    return {"share": token / passing, "ar_forward_ms": 1e3 * token, "pass_forward_ms": 1e3 * passing,
            "wall_share": (wall["ar"] / counts["ar"]) / (wall["jacobi"] / counts["jacobi"]),
            "ar_wall_ms": 1e3 * wall["ar"] / counts["ar"], "pass_wall_ms": 1e3 * wall["jacobi"] / counts["jacobi"],
            "prompts": len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                        help="a finished `cllm run` of --config: its teacher/, final CLLM and prompts/")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--prompts", type=int, default=2000, help="held-out prompts to decode")
    parser.add_argument("--json", type=Path, help=f"default: benchmarks/results/demo_held_out-{cpu_class()}.json")
    args = parser.parse_args()
    if args.prompts < 1:
        parser.error("--prompts must be at least 1")
    profile = load_profile(args.config)
    cllm = "cllm-round2" if profile.second_round is not None else "cllm"  # the pipeline's final CLLM
    missing = [name for name in ("teacher", cllm, "prompts/eval.parquet") if not (args.run_dir / name).exists()]
    if missing:
        sys.exit(f"error: {args.run_dir} has no {', '.join(missing)}; finish `cllm run --config {args.config} "
                 f"--work-dir {args.run_dir}` first")
    models = {"teacher": ModelConfig(name_or_path=str(args.run_dir / "teacher")),
              "cllm": ModelConfig(name_or_path=str(args.run_dir / cllm))}
    out_dir = args.run_dir / f"held-out-{args.prompts}"
    prompts_path = held_out_prompts(profile, models["teacher"], args.prompts, out_dir / "prompts",
                                    args.run_dir / "prompts" / "eval.parquet")
    config = profile.evaluate.model_copy(update={"check": resolve_check(profile.evaluate, prompts_path)})
    prompts, chat = eval_prompts(prompts_path)
    precision = resolve(profile.precision, "cpu").name
    loaded = {name: load_model(source, DTYPES[precision]) for name, source in models.items()}
    tokenizer = load_tokenizer(models["teacher"])
    budget = config.jacobi.max_new_tokens
    decoders = {"ar": partial(greedy_generate, max_new_tokens=budget),
                "jacobi": partial(jacobi_generate, **config.jacobi.arguments())}
    print(f"{len(prompts)} held-out prompts; teacher AR, CLLM AR and CLLM Jacobi at n_tokens {config.jacobi.n_tokens} "
          f"in {precision}, batch 1 ({torch.backends.cpu.get_cpu_capability()} class)")
    start = time.perf_counter()
    pairs = {pair: decoders[pair[1]] for pair in PAIRS}
    samples = evaluate(loaded, tokenizer, prompts, chat, config.model_copy(update={"batch_size": 1}),
                       log=partial(every_hundred, total=len(prompts)), pairs=pairs)
    seconds = time.perf_counter() - start
    pq.write_table(pa.Table.from_pylist(samples), out_dir / "samples.parquet")
    forward = forward_share(loaded["cllm"], tokenizer, prompts[:200], chat, decoders)

    run_ids = set(pq.read_table(args.run_dir / "prompts" / "eval.parquet", columns=["prompt_id"])
                  .column("prompt_id").to_pylist())
    found = {"all": quality(samples), "demo_prompts": quality(samples, run_ids)}
    goals = {name: verdicts(figures_of, QUALITY) for name, figures_of in found.items()}
    result = {"commit": git_commit(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "command": " ".join(["python -m benchmarks.held_out", *sys.argv[1:]]), "config": str(args.config),
              "run_dir": str(args.run_dir), "cllm": str(args.run_dir / cllm), "prompts_dir": str(out_dir / "prompts"),
              "precision": precision, "n_tokens": config.jacobi.n_tokens, "seconds": seconds,
              "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
              "figures": found, "goals": goals, "forward_share": forward}
    print("\n" + report(result))
    write_json(args.json or Path(__file__).resolve().parent / "results" / f"demo_held_out-{cpu_class()}.json", result)


def every_hundred(line: str, total: int) -> None:
    """Print evaluate's progress line ("k/N prompts") every 100 prompts and at the end."""
    done = int(line.split("/")[0])
    if done % 100 == 0 or done == total:
        print(line)


def report(result: dict) -> str:
    """The goals for all the prompts and for the demo's own, side by side."""
    every, demo = result["goals"]["all"], result["goals"]["demo_prompts"]
    counts = result["figures"]["all"]["prompts"], result["figures"]["demo_prompts"]["prompts"]
    lines = [f"| goal | {counts[0]} held-out prompts | the demo's {counts[1]} | |", "|---|---|---|---|"]
    for name, goal in every.items():
        lines.append(f"| {name} | {goal['value']:.3f}: {'MET' if goal['met'] else '**NOT MET**'} | "
                     f"{demo[name]['value']:.3f}: {'MET' if demo[name]['met'] else '**NOT MET**'} | "
                     f"{goal['direction']} {goal['goal']} |")
    forward = result.get("forward_share")
    if forward:
        lines.append(f"\nThe wall share of the model's forward alone: {forward['share']:.2f} (the CLLM's forward calls "
                     f"take {forward['ar_forward_ms']:.2f} ms an AR token and {forward['pass_forward_ms']:.2f} ms a "
                     f"Jacobi pass); in the same decodes ({forward['prompts']} prompts) the whole wall share is "
                     f"{forward['wall_share']:.2f} ({forward['ar_wall_ms']:.2f} and {forward['pass_wall_ms']:.2f} ms)")
    return "\n".join(lines) + (f"\n\n{result['cpu_capability']} class, commit {result['commit'][:7]}, "
                               f"{result['seconds'] / 60:.1f} minutes; `{result['command']}`")


if __name__ == "__main__":
    main()
