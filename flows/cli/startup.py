"""Before a stage command's first flow: precision said once, Prefect's API up (its state in the work dir unless
the user points Prefect elsewhere), the MLflow store answering, and Prefect's terminal output free of bad-input
tracebacks."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import TrackingConfig
from flows.cli.base import console, created, input_errors
from flows.server import REMEDY, TemporaryServer


def announce_precision(setting: str, device: str, name_or_path: str | None = None):
    """Resolve the precision once for this process and say it, before any work: the same choice every stage uses
    (with `name_or_path`, a CLLM's own measured choice where `auto` allows it)."""
    from cllm_core.runtime.precision import for_model, resolve

    resolved = for_model(setting, name_or_path, device) if name_or_path else resolve(setting, device)
    console.print(resolved.describe(), highlight=False, soft_wrap=True)
    return resolved


def start_prefect(work_dir: Path, tracking: TrackingConfig) -> None:
    """Make Prefect's API answer before any flow starts, or say in one line why not. Unless the user points
    Prefect elsewhere, its state lives in the work dir and its temporary server (flows/server.py) boots while this
    process does what every stage needs first: import Prefect and the model code, set up the MLflow store (a new
    SQLite store takes seconds). Prefect reads its settings once, on import: they are all set before. Prefect
    attaches its console handler when it is imported: bad-input tracebacks are kept off it. Credentials in
    $MLFLOW_TRACKING_URI move to MLflow's variables, so the processes Prefect starts get the bare URI. A tracking
    server that does not answer is one line before the wait for Prefect's."""
    server = use_work_dir(work_dir)
    from tasks.tracking import check_tracking, move_credentials, tracking_uri

    move_credentials()
    import prefect.main  # noqa: F401  (importing it sets up Prefect's logging)

    quiet_input_errors()
    uri = tracking_uri(tracking, work_dir)
    check_tracking(uri)
    if uri.startswith("sqlite:"):
        import mlflow

        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    import transformers

    import cllm_core.runtime.models  # noqa: F401  (torch and transformers: every stage loads a tokenizer or a model)

    # Hugging Face's bars (a model load, a dataset split) end mid-line, before the next line of this command
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()

    if server is not None:
        server.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    else:
        start_prefect_server()


def start_prefect_server() -> None:
    """Start Prefect's own temporary server now if it would start one at the first flow: a slow start is one line."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    try:
        SubprocessASGIServer().start()
    except RuntimeError as error:
        raise UserError(f"Prefect's temporary server did not come up ({str(error).splitlines()[0]}); "
                        f"{REMEDY}") from None


def quiet_input_errors() -> None:
    """Drop the traceback of bad-input errors from Prefect's terminal output (its API log keeps it)."""
    for handler in prefect_console_handlers():
        if not any(isinstance(f, _QuietInputErrors) for f in handler.filters):
            handler.addFilter(_QuietInputErrors())


def prefect_console_handlers() -> list[logging.Handler]:
    return [handler for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers
            if type(handler).__name__ == "PrefectConsoleHandler"]


class _QuietInputErrors(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for bad input the one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], input_errors()):
            record.exc_info = record.exc_text = None
        return True


def check_work_dir(work_dir: Path) -> None:
    """A work dir that cannot be one (it, or a folder above it, is a file; a folder that cannot be written) is one
    line before any work."""
    existing = next(p for p in (work_dir, *work_dir.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise UserError(f"--work-dir {work_dir}: {existing} is a file, not a directory; choose another work dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--work-dir {work_dir}: {existing} is not writable; choose another work dir")


def use_work_dir(work_dir: Path) -> TemporaryServer | None:
    """Keep Prefect's local state in the work dir and start its temporary server there, unless the user points
    Prefect elsewhere. Returns the server; None if Prefect was imported already: it has read its settings then,
    and starts its own server, which still finds the work dir in $PREFECT_HOME."""
    check_work_dir(work_dir)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if "PREFECT_API_URL" in os.environ or "PREFECT_HOME" in os.environ:
        return None
    home = work_dir / ".prefect"
    if not work_dir.exists():
        created["work_dir"] = work_dir
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home.resolve())
    if "prefect" in sys.modules:
        return None
    server = created["server"] = TemporaryServer(home)
    os.environ["PREFECT_API_URL"] = server.url
    os.environ["PREFECT_UI_URL"] = ""  # it serves no UI: no "View at" links that lead nowhere
    return server
