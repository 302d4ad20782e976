"""Benchmarks print figures (a table and JSON); they never assert on time."""

import json
import subprocess
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


def cpu_class() -> str:
    """`avx512`, `avx2`, ...: the kernels torch runs here (ATEN_CPU_CAPABILITY lowers them); names results files."""
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


def git_commit() -> str:
    """The checkout's HEAD, which a results file names."""
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def between_markers(text: str, markers: tuple[str, str], block: str) -> str:
    """`text` with what lies between the two marker lines replaced by `block` (the README's generated tables)."""
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    return f"{text[:start]}\n{block}\n{text[end:]}"
