"""Identity: what an artifact was made from, as one short hash, made one way everywhere.

Every cache key and resume check of the project (the teacher's and fine-tuning's configs, the model, the
tokenizer, the collection, the training data, prompt ids) is a `digest`: the sha256 of the value's canonical
JSON (bytes as they are), truncated. What does not change the artifact stays out of the value.

A model is identified by its content, not by its name, its directory or the device it is loaded on: the bytes
of its config, generation config, tokenizer and weight files. Two copies of the same weights are the same
model; a model retrained in place (same shapes, new weights) is another. Weights are hashed once: each file's
sha256 is recorded in a sidecar (`.cllm-identity.json`) beside it, keyed by the file's size and timestamps,
and hashed again only when they change (or on every run, memoised per process, where the directory is not
writable or belongs to an installed package). A hub id is identified by its id and revision: nothing is
downloaded to hash it, so pin `revision` to a commit for an identity that cannot move.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

SIDECAR = ".cllm-identity.json"
SIDECAR_VERSION = 1
SETTINGS_FILES = ("config.json", "generation_config.json")  # architecture; EOS and pad of decoding
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def canonical(value: Any) -> bytes:
    """The bytes a value is hashed as: bytes as they are, anything else as sorted-key JSON (str() for the rest)."""
    if isinstance(value, bytes):
        return value
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode()


def digest(value: Any, length: int = 16) -> str:
    """The identity of a value: the first `length` hex digits of the sha256 of its canonical form."""
    return hashlib.sha256(canonical(value)).hexdigest()[:length]


def file_digest(path: str | Path) -> str:
    """The full sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def seed_of(*key: Any) -> int:
    """A 64-bit RNG seed derived from a key (sha256 of its repr). Not an identity: its recipe is older than
    `digest` and stays, because changing it would change every seeded draw (the fine-tuning batches)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big")


def model_files(directory: Path, gguf: str | None, remote_code: bool = False) -> list[str]:
    """The files of a model directory that decide its outputs: settings, tokenizer and weights (only the named
    GGUF file when there is one), and the modelling code when it is trusted and run."""
    present = sorted(p.name for p in directory.iterdir() if p.is_file())
    weights = [gguf] if gguf else [name for name in present if name.endswith(WEIGHT_SUFFIXES)]
    code = [name for name in present if name.endswith(".py")] if remote_code else []
    return [name for name in (*SETTINGS_FILES, *TOKENIZER_FILES) if name in present] + weights + code


def file_hashes(directory: Path, names: list[str], record: bool = True) -> dict[str, str]:
    """The sha256 of each named file, taken from the sidecar where the file's stamp still matches it; files
    hashed anew are recorded there when `record` and the directory allow."""
    recorded = _read_sidecar(directory)
    entries, fresh = {}, False
    for name in names:
        stamp = _stamp(directory / name)
        entry = recorded.get(name)
        if entry is None or {key: entry.get(key) for key in stamp} != stamp:
            sha256 = _stamped_digest(str(directory / name), stamp["size"], stamp["mtime_ns"], stamp["ctime_ns"])
            entry, fresh = stamp | {"sha256": sha256}, True
        entries[name] = entry
    if fresh and record:
        _write_sidecar(directory, entries)
    return {name: entry["sha256"] for name, entry in entries.items()}


def _stamp(path: Path) -> dict[str, int]:
    """What changes whenever a file's content may have: its size, mtime and ctime (which no tool can set back)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


@functools.lru_cache(maxsize=256)
def _stamped_digest(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return file_digest(path)


def _read_sidecar(directory: Path) -> dict[str, dict]:
    try:
        recorded = json.loads((directory / SIDECAR).read_text())
    except (OSError, ValueError):  # none yet, unreadable or damaged: hash again
        return {}
    return recorded.get("files", {}) if recorded.get("version") == SIDECAR_VERSION else {}


def _write_sidecar(directory: Path, entries: dict[str, dict]) -> None:
    """Write the sidecar atomically; a directory that cannot take it is hashed again next time."""
    temporary = directory / f"{SIDECAR}.{uuid.uuid4().hex}.tmp"
    try:
        temporary.write_text(json.dumps({"version": SIDECAR_VERSION, "files": entries}, indent=2, sort_keys=True))
        os.replace(temporary, directory / SIDECAR)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
