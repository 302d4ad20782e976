"""Benchmarks print figures (a table and JSON); they never assert on time."""

import json
from pathlib import Path


def write_json(path: Path | None, result: dict) -> None:
    """Write the figures as JSON (whole or not at all) when a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(result, indent=2, default=str) + "\n")
    partial.replace(path)
    print(f"wrote {path}")
