"""Stop when asked: one stop request per process, which long loops check between units of work.

Whoever hears the request (the CLI's SIGTERM/SIGINT handler, a flow interrupted by a cancellation) calls
`request_stop()`; the loops that run for long (each Jacobi pass, each training step) call `raise_if_stopped()`
first thing, so work in any thread ends within one unit. What it leaves behind is whole or ignored: shards,
checkpoints and models are written to a staging name and renamed when complete, so a rerun resumes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

_requested = threading.Event()
_listeners: list[Callable[[], None]] = []
STOP_FILE = "CLLM_STOP_FILE"
"""An environment variable naming a file whose existence is a stop request too: how a request reaches worker
processes that a parent started (a Dask cluster's), which share no memory with it."""


class Stopped(KeyboardInterrupt):
    """A loop saw the stop request. An interrupt, not an error: `except Exception` lets it through, and Prefect
    records the run as crashed (no retries) instead of failed."""


def request_stop() -> None:
    _requested.set()
    for listener in list(_listeners):
        listener()


def on_stop_request(listener: Callable[[], None]) -> Callable[[], None]:
    """Call `listener` on each stop request, whoever makes it (the CLI arms its deadline); returns what removes it."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def stop_requested() -> bool:
    if not _requested.is_set() and (path := os.environ.get(STOP_FILE)) and os.path.exists(path):
        _requested.set()  # the parent asked: from now on this process's loops stop as if asked here
    return _requested.is_set()


def raise_if_stopped() -> None:
    if stop_requested():
        raise Stopped("stopped at your request")


def clear_stop() -> None:
    """Forget the request, for a process that goes on after a stop (a test, a notebook)."""
    _requested.clear()
