"""One launched fine-tuning process, the worker's side of cllm_core.training.launch: `accelerate launch` runs

    python -m cllm_core.training.worker SPEC.json   # never by hand

in every process. Each trains through the same `train_here` loop; the main one writes what the caller's callbacks
would have received as JSON lines (`events.jsonl`), and a process that raises leaves one line in
`failed-<rank>.txt`. A worker whose caller is gone ends itself.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cllm_core.runtime.config import FinetuneConfig, ModelConfig
from cllm_core.runtime.files import shared_until_exit
from cllm_core.training.finetune import train_here, workers_lock_path
from cllm_core.training.launch import process_start


def main(spec_path: str) -> None:
    """One launched process: train from the spec; the main process writes the callbacks' events."""
    spec, work = json.loads(Path(spec_path).read_text()), Path(spec_path).parent
    rank = int(os.environ.get("RANK", "0"))
    shared_until_exit(workers_lock_path(Path(spec["out_dir"])))  # a rerun waits until this process is gone
    exit_with_caller(spec["caller"], spec.get("caller_started"))
    if hasattr(signal, "SIGUSR1"):  # (not on Windows)
        stacks[:] = [open(work / f"stacks-{rank}.txt", "w")]  # kept open: faulthandler writes to its descriptor
        faulthandler.register(signal.SIGUSR1, file=stacks[0], all_threads=True)
        (work / f"pid-{rank}.txt").write_text(str(os.getpid()))
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
        what = str(error).strip().splitlines()[0] if str(error).strip() else ""
        line = f"{type(error).__name__}: {what}" if what else type(error).__name__
        (work / f"failed-{rank}.txt").write_text(f"{time.time_ns()} {line}")
        raise


stacks: list = []
"""This process's `stacks-<rank>.txt`, where SIGUSR1 (the caller's `Stall`) has every thread's stack written."""


def exit_with_caller(caller: int, started: str | None) -> None:
    """End this process if the caller that launched it dies without stopping it (killed, out of memory): a
    launch nobody waits for would go on training into the same directory as the caller's rerun. The caller is
    its pid and, where the system says it (Linux), the time it started: a pid the system gives to a new process
    is not the caller."""

    def watch() -> None:
        while True:
            time.sleep(2)
            if not caller_alive(caller, started):
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="caller-watch").start()


def caller_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's: not the caller, who is ours
        return started is None
    return started is None or process_start(pid) == started


if __name__ == "__main__":
    main(sys.argv[1])
