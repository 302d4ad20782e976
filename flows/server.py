"""Prefect's temporary API server for one `cllm` command, started before this process imports Prefect.

Prefect would start the same server itself at the first flow, after this process has imported Prefect, its
server code, MLflow and torch. Started first, it boots in its own process meanwhile. Prefect reads its settings
once, when it is imported: by then PREFECT_API_URL names this server, so Prefect uses it and starts none of its
own. Its database is `$PREFECT_HOME/prefect.db` (set up once per home), its log `$PREFECT_HOME/server.log`; it
stops when the command ends.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cllm_core.engine.errors import UserError

_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None  # found here, not after fork
REMEDY = ("set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher (e.g. 300) on a slow or busy machine, or "
          "PREFECT_API_URL to a running server (`prefect server start`)")


class TemporaryServer:
    """`uvicorn` serving Prefect's API on a free local port, as Prefect runs its own temporary server."""

    def __init__(self, home: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{port}/api", home / "server.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}  # not its business
        env |= {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
                 "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                process_group=0,  # a terminal's Ctrl-C reaches only `cllm`, which still needs the server to record it
                preexec_fn=_die_with_parent if _PRCTL else None)
        self.started = time.monotonic()
        atexit.register(self.stop)

    def wait(self, timeout: float) -> None:
        """Return once the API answers; a server that exits, or is silent `timeout` s after its start, is one line."""
        deadline = self.started + timeout
        while True:  # asked long after its start, a server that is up answers the first time
            if self.process.poll() is not None:
                raise UserError(f"Prefect's temporary server exited (code {self.process.returncode}) before "
                                      f"it answered; see {self.log}, or set PREFECT_API_URL to a running server")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise UserError(f"Prefect's temporary server did not answer within {timeout:g} s; "
                                          f"{REMEDY}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _die_with_parent() -> None:
    """Run in the server's process before it starts: SIGTERM when `cllm` dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    _PRCTL(1, signal.SIGTERM)
