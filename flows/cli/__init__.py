"""`cllm`: one command, a sub-command per stage. Errors print one line and exit non-zero.

base (the app, errors, options read from the configs) · startup (precision, Prefect, MLflow before the first
flow) · progress (live bars) · decode · stages · runs (MLflow UI and comparison).
"""

from flows.cli import decode, runs, stages  # noqa: F401  (each registers its commands)
from flows.cli.base import app
from flows.cli.progress import live_progress
from flows.cli.startup import use_work_dir

__all__ = ["app", "live_progress", "use_work_dir"]
