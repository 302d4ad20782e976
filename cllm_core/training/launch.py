"""Fine-tuning over N processes from one call, the caller's side: `finetune` launches the worker module under
`accelerate launch` and waits.

The caller (the Prefect task, the CLI, a notebook) stays the one process that talks to the world: each launched
process trains through the same `cllm_core.training.finetune` loop, and the main one writes what the callbacks
would have received (log lines, warnings, metrics, samples, progress) as JSON lines that the caller replays into its own
callbacks while it waits, so MLflow gets one run with the figures every process agrees on. The work lives in
`<out_dir>.launch/`: the spec every process reads, the events, the launcher's own output (`launcher.log`), and
`failed-<rank>.txt`, one line from each process that raised. A failed process fails the call with one line that
names it; the checkpoints stay, and the same call resumes from them under the same launch. A launch that reports
nothing for long (`STALL_S`: a process stuck in a collective waits out its 2-hour timeout) is said in one warning,
with every process's stacks in `stacks-<rank>.txt`, and left running.

    python -m cllm_core.training.worker SPEC.json   # what each process runs (cllm_core/training/worker.py)
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

from cllm_core.engine.errors import UserError
from cllm_core.engine.stopping import Stopped, stop_requested
from cllm_core.runtime.config import FinetuneConfig, LaunchSection, ModelConfig
from cllm_core.runtime.records import CllmRecord

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # accelerate's names
STALL_S = "CLLM_LAUNCH_STALL_S"
"""Seconds without an event from the training processes before the launch warns (default 900; at least 10 times
the longest wait between events so far: a 7B model's logging interval or checkpoint can take minutes)."""


def launched(launch: LaunchSection) -> bool:
    """Whether training runs in processes of its own: more than one, or FSDP (which shards even over one)."""
    return launch.processes > 1 or launch.strategy == "fsdp"


ACCELERATE_CONFIG = "compute_environment: LOCAL_MACHINE\ndistributed_type: NO\nnum_machines: 1\n"
"""The launch's own accelerate config: without one, `accelerate launch` fills every option the command leaves
out from the user's ~/.cache/huggingface/accelerate/default_config.yaml (its gpu_ids, its FSDP settings)."""


def accelerate_command(launch: LaunchSection, precision: str, gradient_checkpointing: bool, cuda: bool,
                       port: int, work: Path) -> list[str]:
    """`accelerate launch` of the worker module over `launch.processes` processes on this machine, reading
    `work/spec.json` and `work/accelerate.yaml` (ACCELERATE_CONFIG).

    DDP: one process per GPU, or gloo over the CPU's cores shared out. FSDP2 with its auto-wrap of the
    model's decoder layers, full or gradient/optimizer-only sharding, CPU offload, activation checkpointing in
    place of the model's own, and full state dicts gathered for saving.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(work / "accelerate.yaml"),
               "--num_processes", str(launch.processes), "--num_machines", "1", "--main_process_port", str(port),
               "--dynamo_backend", "no", "--mixed_precision", MIXED_PRECISION[precision]]
    if launch.strategy == "fsdp":
        command += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                    "--fsdp_reshard_after_forward", _flag(launch.fsdp_sharding == "full_shard"),
                    "--fsdp_offload_params", _flag(launch.cpu_offload),
                    "--fsdp_activation_checkpointing", _flag(gradient_checkpointing),
                    "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "true"]
    elif launch.processes > 1:  # torchrun's launcher, on GPUs or CPUs alike; each process's Accelerator picks
        command += ["--multi_gpu"]  # NCCL or gloo (`--cpu` with several processes starts only one)
    if not cuda:  # accelerate's default is one thread per process
        command += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // launch.processes))]
    return command + ["--module", "cllm_core.training.worker", str(work / "spec.json")]


def launch_finetune(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, *,
                    answers: dict[str, str] | None, probe: tuple[list[str], bool], precision: str,
                    log: Callable[[str], None], warn: Callable[[str], None], on_metrics, on_samples,
                    progress) -> CllmRecord:
    """Run `config.launch.processes` training processes, relay their events to the callbacks, and return the
    published record; one line naming the process when any fails."""
    import torch

    from cllm_core.runtime.models import resolve_device
    from cllm_core.runtime.precision import resolve

    launch, cuda = config.launch, resolve_device(model.device).type == "cuda"
    precision = resolve(precision, model.device).name  # decided once, here: every process trains in it
    if launch.strategy == "fsdp" and not cuda:
        raise UserError("finetune.launch.strategy fsdp shards the model over GPUs and this machine has none "
                        "(accelerate runs FSDP on CUDA devices only); use strategy ddp here")
    if cuda and launch.processes > torch.cuda.device_count():
        raise UserError(f"finetune.launch.processes is {launch.processes} but this machine has "
                        f"{torch.cuda.device_count()} GPU(s); one process per GPU")
    work = out_dir.parent / f"{out_dir.name}.launch"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "spec.json").write_text(json.dumps({
        "config": config.model_dump(), "model": model.model_dump(), "store": store, "out_dir": str(out_dir),
        "answers": answers, "probe": list(probe), "precision": precision, "caller": os.getpid(),
        "caller_started": process_start(os.getpid())}))
    (work / "accelerate.yaml").write_text(ACCELERATE_CONFIG)
    command = accelerate_command(launch, precision, config.gradient_checkpointing, cuda, _free_port(), work)
    log(f"launching {launch.processes} training process(es) ({launch.strategy}): {' '.join(command[1:])}")
    relay = EventRelay(work / "events.jsonl", {"log": log, "warn": warn, "metrics": on_metrics, "samples": on_samples,
                                          "progress": progress})
    with open(work / "launcher.log", "w") as output:  # a session of its own: the terminal's Ctrl-C is ours
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=os.environ | {"PYTHONUNBUFFERED": "1"})
    stall = StallWatch(work, float(os.environ.get(STALL_S) or 900), warn)
    try:
        while process.poll() is None:
            if relay.poll():
                stall.heard()
            else:
                stall.check()
            if stop_requested():
                raise Stopped("stopped at your request")
            time.sleep(0.2)
    except BaseException:  # stopped, cancelled, interrupted: no process outlives the call
        stop_launcher(process)
        raise
    relay.poll()
    if process.returncode != 0:
        raise RuntimeError(failure(work, launch.processes, process.returncode))
    record = json.loads((out_dir / "cllm.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return CllmRecord.from_json(record, path=str(out_dir))


class EventRelay:
    """Replays the main process's events (JSON lines, appended as they happen) into the caller's callbacks."""

    def __init__(self, path: Path, callbacks: dict[str, Callable | None]):
        self.path, self.callbacks, self.offset = path, callbacks, 0

    def poll(self) -> bool:
        """Replay the events written since the last poll; whether there were any."""
        if not self.path.is_file():
            return False
        start = self.offset
        with open(self.path) as events:
            events.seek(self.offset)
            while (line := events.readline()).endswith("\n"):  # a line still being written waits for the next poll
                self.offset = events.tell()
                event = json.loads(line)
                callback = self.callbacks[event["kind"]]
                if callback is not None:
                    callback(*event["args"])
        return self.offset > start


class StallWatch:
    """Says once, when the training processes have sent nothing for `floor` seconds and 10 times their longest
    silence so far, that the launch may be stuck, after asking each process for its stacks (SIGUSR1: `main`)."""

    def __init__(self, work: Path, floor: float, warn: Callable[[str], None]):
        self.work, self.floor, self.warn = work, floor, warn
        self.last, self.longest, self.said, self.started = time.monotonic(), 0.0, False, False

    def heard(self) -> None:
        now = time.monotonic()
        if self.started:  # (the start, loading the model, is not a silence between steps)
            self.longest = max(self.longest, now - self.last)
        self.last, self.said, self.started = now, False, True

    def check(self) -> None:
        silent = time.monotonic() - self.last
        if self.said or silent < max(self.floor, 10 * self.longest):
            return
        self.said = True
        asked = []
        for pid in self.work.glob("pid-*.txt"):
            try:
                os.kill(int(pid.read_text()), signal.SIGUSR1)
                asked.append(self.work / pid.name.replace("pid-", "stacks-"))
            except (ProcessLookupError, ValueError):
                pass
        deadline = time.monotonic() + 10  # a busy machine may take a moment to run the processes' handlers
        while time.monotonic() < deadline and not all(path.stat().st_size for path in asked if path.is_file()):
            time.sleep(0.1)
        self.warn(f"the fine-tuning launch has sent nothing for {silent:.0f} s (its longest silence before: "
                  f"{self.longest:.0f} s); a process may be stuck in a collective. Each process's stacks are in "
                  f"{self.work}/stacks-<rank>.txt, its output in launcher.log; still waiting")


def failure(work: Path, processes: int, code: int) -> str:
    """One line: which process failed first and why. A process that raised wrote `failed-<rank>.txt` (when, in
    ns, then the error) before it exited, so before the others lost their connection to it and wrote theirs;
    a process killed from outside (out of memory, a signal) wrote none, and the launcher's report names it."""
    resume = "the same command resumes from the last checkpoint"
    written = {int(path.stem.removeprefix("failed-")): path.read_text(errors="replace").split(" ", 1)
               for path in work.glob("failed-*.txt")}
    killed = [(rank, exitcode) for rank, exitcode in _exits(work / "launcher.log")
              if exitcode < 0 and rank not in written]
    if killed:
        rank, exitcode = killed[0]
        return (f"fine-tuning process {rank} of {processes} was killed by signal {-exitcode} (out of memory?); see "
                f"{work / 'launcher.log'}; {resume}")
    if written:
        rank, (_, error) = min(written.items(), key=lambda item: int(item[1][0]))
        return f"fine-tuning process {rank} of {processes} failed: {error.strip()}; {resume}"
    log = (work / "launcher.log").read_text(errors="replace").strip().splitlines() or ["no output"]
    return f"the fine-tuning launch failed (exit code {code}): {log[-1]}; see {work / 'launcher.log'}"


def _exits(launcher_log: Path) -> list[tuple[int, int]]:
    """(rank, exit code) of every failed process in torch's closing report, if any: its "Root Cause (first
    observed failure)" first, then the others ("Failures:", which the report prints before the root cause)."""
    text = launcher_log.read_text(errors="replace") if launcher_log.is_file() else ""
    report = text.rpartition("Failures:")[2] if "Failures:" in text else ""
    others, _, root = report.partition("Root Cause")
    return [(int(rank), int(code)) for part in (root, others) for rank, code in
            re.findall(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+)", part)]


def stop_launcher(process: subprocess.Popen) -> None:
    """Stop the launcher (its session), politely, then not: on SIGTERM torch's agent stops the training
    processes, which run in sessions of their own (and end by themselves once the caller is gone: `main`)."""
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


def process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22); None where there is no
    /proc or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces and parentheses

