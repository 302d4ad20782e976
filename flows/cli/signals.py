"""How a command stops: SIGTERM and Ctrl-C ask every long loop to stop (cllm_core.engine.stopping) and interrupt
the main thread, so a command ends within about one Jacobi pass or training step, with one line; and a deadline
ends the process whatever still holds it, printing what each thread was doing."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

STOPPED = "stopped at your request; run the same command again to resume"


STOP_GRACE_S = "CLLM_STOP_GRACE_S"
"""How long a stopped command may take to end (default 120 s: a Jacobi pass or training step, then the records)
before it exits anyway, printing what each thread was doing: a stop that never ends would be a silent hang."""


def stop_on_signals() -> Callable[[], None]:
    """Make SIGTERM and Ctrl-C ask every long loop to stop (cllm_core.engine.stopping) and interrupt the main thread, so
    a command ends within about one Jacobi pass or training step, with one line; returns what undoes it. During a
    flow Prefect's SIGTERM handler raises in the main thread instead, and the flows pass the request on. Any stop
    request, however it came, arms a deadline (`StopDeadline`)."""
    from cllm_core.engine.stopping import clear_stop, on_stop_request

    clear_stop()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    deadline = StopDeadline(float(os.environ.get(STOP_GRACE_S) or 120))
    forget = on_stop_request(deadline.arm)

    def restore() -> None:
        forget()
        deadline.ended.set()
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def _stop(signum: int, frame) -> None:
    from cllm_core.engine.stopping import Stopped, request_stop

    request_stop()
    raise Stopped(STOPPED)


class StopDeadline:
    """After a stop request, end the process within `grace` seconds whatever holds it (a thread the request does
    not reach, a lock an interrupted call left taken): one line, every thread's stack, exit code 130. A command
    that ended (`ended` set) while the process goes on (a notebook, a test) is left alone; one whose interpreter
    is still waiting at exit for a thread is not. What it cuts short is whole or ignored (shards, checkpoints and
    models are renamed into place when complete)."""

    def __init__(self, grace: float):
        self.grace, self.ended, self.armed = grace, threading.Event(), False

    def arm(self) -> None:
        if not self.armed:
            self.armed = True
            threading.Thread(target=self._watch, daemon=True, name="stop-deadline").start()

    def _watch(self) -> None:
        time.sleep(self.grace)
        if self.ended.is_set() and threading.main_thread().is_alive():
            return
        err = sys.__stderr__  # the process's own stream: a test's or a notebook's replacement may have no file
        try:
            err.write(f"stopped: still running {self.grace:g} s after the stop request; exiting now ({STOPPED}). "
                      "What each thread was doing:\n")
            err.flush()
            faulthandler.dump_traceback(file=err, all_threads=True)
            err.flush()
        finally:
            os._exit(130)
