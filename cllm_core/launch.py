"""Fine-tuning over N processes from one call: `finetune` launches this module under `accelerate launch` and waits.

The caller (the Prefect task, the CLI, a notebook) stays the one process that talks to the world: each launched
process trains through the same `cllm_core.finetune` loop, and the main one writes what the callbacks would have
received (log lines, warnings, metrics, samples, progress) as JSON lines that the caller replays into its own
callbacks while it waits, so MLflow gets one run with the figures every process agrees on. The work lives in
`<out_dir>.launch/`: the spec every process reads, the events, the launcher's own output (`launcher.log`), and
`failed-<rank>.txt`, one line from each process that raised. A failed process fails the call with one line that
names it; the checkpoints stay, and the same call resumes from them under the same launch.

    python -m cllm_core.launch SPEC.json   # what each process runs; never by hand
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cllm_core.config import FinetuneConfig, LaunchSection, ModelConfig
from cllm_core.records import CllmRecord
from cllm_core.stopping import Stopped, stop_requested

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # accelerate's names


def launched(launch: LaunchSection) -> bool:
    """Whether training runs in processes of its own: more than one, or FSDP (which shards even over one)."""
    return launch.processes > 1 or launch.strategy == "fsdp"


def accelerate_command(launch: LaunchSection, precision: str, gradient_checkpointing: bool, cuda: bool,
                       port: int, spec: Path) -> list[str]:
    """`accelerate launch` of this module over `launch.processes` processes on this machine.

    DDP: one process per GPU, or gloo over the CPU's cores shared out. FSDP2 with its auto-wrap of the
    model's decoder layers, full or gradient/optimizer-only sharding, CPU offload, activation checkpointing in
    place of the model's own, and full state dicts gathered for saving.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.processes),
               "--num_machines", "1", "--main_process_port", str(port), "--dynamo_backend", "no",
               "--mixed_precision", MIXED_PRECISION[precision]]
    if launch.strategy == "fsdp":
        command += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                    "--fsdp_reshard_after_forward", _flag(launch.fsdp_sharding == "full_shard"),
                    "--fsdp_offload_params", _flag(launch.cpu_offload),
                    "--fsdp_activation_checkpointing", _flag(gradient_checkpointing),
                    "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "true"]
    elif launch.processes > 1:  # torchrun's launcher, on GPUs or CPUs alike; each process's Accelerator picks
        command += ["--multi_gpu"]  # NCCL or gloo (`--cpu` with several processes starts only one)
    return command + ["--module", "cllm_core.launch", str(spec)]


def launch_finetune(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, *,
                    answers: dict[str, str] | None, probe: tuple[list[str], bool], precision: str,
                    log: Callable[[str], None], warn: Callable[[str], None], on_metrics, on_samples,
                    progress) -> CllmRecord:
    """Run `config.launch.processes` training processes, relay their events to the callbacks, and return the
    published record; one line naming the process when any fails."""
    import torch

    from cllm_core.precision import resolve

    launch, cuda = config.launch, torch.cuda.is_available()
    precision = resolve(precision, model.device).name  # decided once, here: every process trains in it
    if launch.strategy == "fsdp" and not cuda:
        raise ValueError("finetune.launch.strategy fsdp shards the model over GPUs and this machine has none "
                         "(accelerate runs FSDP on CUDA devices only); use strategy ddp here")
    if cuda and launch.processes > torch.cuda.device_count():
        raise ValueError(f"finetune.launch.processes is {launch.processes} but this machine has "
                         f"{torch.cuda.device_count()} GPU(s); one process per GPU")
    work = out_dir.parent / f"{out_dir.name}.launch"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"config": config.model_dump(), "model": model.model_dump(), "store": store,
                                "out_dir": str(out_dir), "answers": answers, "probe": list(probe),
                                "precision": precision}))
    command = accelerate_command(launch, precision, config.gradient_checkpointing, cuda, _free_port(), spec)
    log(f"launching {launch.processes} training process(es) ({launch.strategy}): {' '.join(command[1:])}")
    relay = Relay(work / "events.jsonl", {"log": log, "warn": warn, "metrics": on_metrics, "samples": on_samples,
                                          "progress": progress})
    with open(work / "launcher.log", "w") as output:  # a session of its own: the terminal's Ctrl-C is ours
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        while process.poll() is None:
            relay.poll()
            if stop_requested():
                raise Stopped("stopped at your request")
            time.sleep(0.2)
    except BaseException:  # stopped, cancelled, interrupted: no process outlives the call
        _end(process)
        raise
    relay.poll()
    if process.returncode != 0:
        raise RuntimeError(failure(work, launch.processes, process.returncode))
    record = json.loads((out_dir / "cllm.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return CllmRecord.from_json(record, path=str(out_dir))


class Relay:
    """Replays the main process's events (JSON lines, appended as they happen) into the caller's callbacks."""

    def __init__(self, path: Path, callbacks: dict[str, Callable | None]):
        self.path, self.callbacks, self.offset = path, callbacks, 0

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as events:
            events.seek(self.offset)
            while (line := events.readline()).endswith("\n"):  # a line still being written waits for the next poll
                self.offset = events.tell()
                event = json.loads(line)
                callback = self.callbacks[event["kind"]]
                if callback is not None:
                    callback(*event["args"])


def failure(work: Path, processes: int, code: int) -> str:
    """One line: which process failed first and why. Its own `failed-<rank>.txt` says why; a process killed
    from outside (out of memory, a signal) left none, and the launcher's report of the first failure names it."""
    first = _first_failure(work / "launcher.log")
    written = sorted(work.glob("failed-*.txt"), key=lambda path: path.stat().st_mtime)
    if first is not None:
        rank, exitcode = first
        own = work / f"failed-{rank}.txt"
        if own.is_file():
            return (f"fine-tuning process {rank} of {processes} failed: {own.read_text().strip()}; the same command "
                    "resumes from the last checkpoint")
        reason = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}"
        return (f"fine-tuning process {rank} of {processes} {reason} (out of memory?); see {work / 'launcher.log'}; "
                "the same command resumes from the last checkpoint")
    if written:
        rank = written[0].stem.removeprefix("failed-")
        return (f"fine-tuning process {rank} of {processes} failed: {written[0].read_text().strip()}; the same "
                "command resumes from the last checkpoint")
    tail = (work / "launcher.log").read_text().strip().splitlines()[-1:] or ["no output"]
    return f"the fine-tuning launch failed (exit code {code}): {tail[0]}; see {work / 'launcher.log'}"


def _first_failure(launcher_log: Path) -> tuple[int, int] | None:
    """(rank, exit code) from torch's "Root Cause (first observed failure)" report, if it wrote one."""
    text = launcher_log.read_text(errors="replace") if launcher_log.is_file() else ""
    root = text.rpartition("Root Cause (first observed failure)")[2]
    rank, code = re.search(r"rank\s*:\s*(\d+)", root), re.search(r"exitcode\s*:\s*(-?\d+)", root)
    return (int(rank.group(1)), int(code.group(1))) if root and rank and code else None


def _end(process: subprocess.Popen) -> None:
    """Stop the launcher and its processes (their session), politely, then not."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _flag(value: bool) -> str:
    return "true" if value else "false"


def main(spec_path: str) -> None:
    """One launched process: train from the spec; the main process writes the callbacks' events."""
    from cllm_core.finetune import train_here

    spec, work = json.loads(Path(spec_path).read_text()), Path(spec_path).parent
    rank = int(os.environ.get("RANK", "0"))
    events = open(work / "events.jsonl", "a") if rank == 0 else None

    def emit(kind: str) -> Callable:
        def write(*args) -> None:
            if events is not None:
                events.write(json.dumps({"kind": kind, "args": args}, default=float) + "\n")
                events.flush()
        return write

    try:
        train_here(FinetuneConfig(**spec["config"]), ModelConfig(**spec["model"]), spec["store"],
                   Path(spec["out_dir"]), answers=spec["answers"], probe=tuple(spec["probe"]),
                   precision=spec["precision"], log=emit("log"), warn=emit("warn"), on_metrics=emit("metrics"),
                   on_samples=emit("samples"), progress=emit("progress"))
    except BaseException as error:
        (work / f"failed-{rank}.txt").write_text(f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
                                                 if str(error).strip() else type(error).__name__)
        raise


if __name__ == "__main__":
    main(sys.argv[1])
