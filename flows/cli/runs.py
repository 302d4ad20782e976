"""MLflow from the terminal: `cllm ui` on the work dir's store, `cllm compare` of runs side by side."""

from __future__ import annotations

from typing import Annotated

import typer

from cllm_core.runtime.config import Profile, masked
from flows.cli.base import command, console


@command(precision=False)
def ui(
    profile: Profile,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the UI on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the UI.")] = 5000,
) -> None:
    """Open the MLflow UI on the work dir's tracking store (http://127.0.0.1:5000 by default)."""
    import subprocess
    import sys

    from tasks.tracking import tracking_uri

    uri = tracking_uri(profile.tracking, profile.work_dir)
    if uri.startswith(("http://", "https://")):
        console.print(f"the runs are on the tracking server {uri}: open it in a browser", highlight=False)
        return
    console.print(f"MLflow UI for {masked(uri)} on http://{host}:{port} (Ctrl-C stops it)", highlight=False)
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                      "--host", host, "--port", str(port)]))


@command("tracking", precision=False)
def compare(
    profile: Profile,
    runs: Annotated[list[str] | None, typer.Argument(help="MLflow run ids (default: the two latest evaluations).",
                                                     show_default=False)] = None,
) -> None:
    """MLflow runs side by side: the parameters that differ, then the headline metrics."""
    from rich.table import Table

    from tasks.tracking import compare_runs

    columns, rows = compare_runs(runs or [], profile.work_dir, profile.tracking)
    table = Table("", *columns, title="runs side by side: differing parameters, then headline metrics")
    for row in rows:
        table.add_row(*row)
    console.print(table)
