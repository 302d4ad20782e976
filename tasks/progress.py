"""Live figures of long stages: streamed to the stage's MLflow run, and told to a terminal listener.

The core's training loops call a progress callback with (step, steps, figures); `reporter` turns that into
MLflow metrics (the same names the run's history gets) and into a call of `step_listener`, which `cllm`
sets to draw its terminal bar (step of total, loss, tokens/s, time left).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar

from mlflow import MlflowClient
from mlflow.entities import Metric

StepListener = Callable[[str, int, int, dict], None]
step_listener: ContextVar[StepListener | None] = ContextVar("step_listener", default=None)
"""Told (stage, step, steps, figures) at every logging step of a training stage; `cllm` draws it."""


def reporter(stage: str, run_id: str | None) -> Callable[[int, int, dict], None]:
    """A progress callback for the core's loops: figures to MLflow run `run_id` at their step, and to the listener."""
    client, listener = MlflowClient(), step_listener.get()

    def report(step: int, steps: int, figures: dict) -> None:
        if run_id is not None:
            log_figures(client, run_id, step, figures)
        if listener is not None:
            listener(stage, step, steps, figures)

    return report


def log_figures(client: MlflowClient, run_id: str, step: int, figures: dict, prefix: str = "") -> None:
    """Numeric figures as one MLflow batch at `step`."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(prefix + key, float(value), now, step) for key, value in figures.items()
                                      if isinstance(value, int | float)])
