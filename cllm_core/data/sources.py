"""Prompt sources: presets, Hugging Face dataset ids and local files, all read through `datasets`.

A source becomes {split: [record]} where a record has `question`, and `answer` / `context` when mapped.
Every way a source can be wrong is an `IngestError` with one line that says what and how to fix it.
"""

from __future__ import annotations

import codecs
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config.catalogue import PRESETS, Preset
from cllm_core.runtime.files import parquet_schema

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("question", "answer", "context", "conversations")


class IngestError(UserError):
    """A prompt source that cannot be ingested; the message is one line for the user."""


def load_records(config, preset: Preset, eval_split: str | None, log) -> dict[str, list[dict]]:
    """{split: records} for the train split (and the eval split when there is one)."""
    splits = [config.train_split] + ([eval_split] if eval_split else [])
    datasets = _load(config, preset, splits, log)
    columns = datasets[splits[0]].column_names
    mapping = {role: role for role in ROLES if role in columns} | preset.fields | config.fields
    if "question" not in mapping and "conversations" not in mapping:
        raise IngestError(f"no question column is mapped for {config.source}; add a field mapping such as "
                          f"question=<column> (columns: {', '.join(columns)})")
    return {("train" if name == config.train_split else "eval"): _records(config.source, data, mapping)
            for name, data in datasets.items()}


def _load(config, preset: Preset, splits: list[str], log) -> dict:
    import datasets

    source = config.source
    if is_local(source):
        if len(splits) > 1:
            raise IngestError(f"{source} is one file, so it has no {splits[1]!r} split; drop eval_split and a seeded "
                              "eval_fraction is held out")
        return {splits[0]: _local(Path(source))}
    if source == "synthetic-math":
        from data.synthetic_math import splits as synthetic

        train, eval_ = synthetic(config.max_train or 5000, config.max_eval or 500)
        return {"train": datasets.Dataset.from_list(train), "eval": datasets.Dataset.from_list(eval_)}
    dataset_id = preset.dataset if source in PRESETS else source
    if source not in PRESETS and "/" not in source:
        raise IngestError(f"unknown preset {source!r}; choose one of {', '.join(PRESETS)}, or give a local "
                          f"{'/'.join(LOCAL_FORMATS)} file or a Hugging Face dataset id (owner/name)")
    if preset.fallback is not None and not hub_reachable():
        log(f"the Hugging Face hub is unreachable; reading {source} from the local copy {preset.fallback}")
        return {split: _local(preset.fallback / f"{split}.jsonl") for split in splits}
    try:
        return {split: datasets.load_dataset(dataset_id, config.subset or preset.subset, split=split)
                for split in splits}
    except (ConnectionError, OSError, ValueError) as error:
        raise IngestError(f"cannot load Hugging Face dataset {dataset_id!r}: {str(error).splitlines()[0]} (offline? "
                          "give a local file instead)") from None


def is_local(source: str) -> bool:
    """Whether `source` names a local file (by its suffix, or because it exists)."""
    return Path(source).suffix.lower() in LOCAL_FORMATS or Path(source).exists()


def _local(path: Path):
    """One local file as a `datasets.Dataset`, after checks that turn library tracebacks into one line."""
    import datasets

    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if not path.is_file():
        raise IngestError(f"prompt file {path} does not exist")
    if kind is None:
        raise IngestError(f"cannot read {path}: use a {'/'.join(LOCAL_FORMATS)} file")
    if kind == "parquet":
        try:
            parquet_schema(path)
        except ValueError as error:
            raise IngestError(str(error)) from None
    else:
        _check_utf8(path)
        with path.open(encoding="utf-8") as lines:
            filled = sum(1 for line, _ in zip((line for line in lines if line.strip()), range(2)))
        if filled < (2 if kind == "csv" else 1):  # a CSV header alone holds no rows
            raise IngestError(f"{path} holds no rows")
    try:
        data = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in DatasetGenerationError
        cause = error.__cause__ or error
        raise IngestError(f"cannot parse {path} as {kind}: {str(cause).splitlines()[0]}") from None
    if len(data) == 0:
        raise IngestError(f"{path} holds no rows")
    return data


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                raise IngestError(f"{path} is not UTF-8 text (byte {block[error.start]:#04x} at offset "
                                  f"{offset + error.start}); re-encode it as UTF-8") from None
            offset += len(block)
    if not offset:
        raise IngestError(f"{path} is empty")


def _records(source: str, data, mapping: dict[str, str]) -> list[dict]:
    unknown = [role for role in mapping if role not in ROLES]
    if unknown:
        raise IngestError(f"unknown field role {unknown[0]!r} in the mapping; roles are {', '.join(ROLES)}")
    missing = {role: column for role, column in mapping.items() if column not in data.column_names}
    if missing:
        role, column = next(iter(missing.items()))
        raise IngestError(f"field mapping {role}={column}: {source} has no column {column!r} "
                          f"(columns: {', '.join(data.column_names)})")
    if len(data) == 0:
        raise IngestError(f"{source} holds no rows")
    columns = {role: data[column] for role, column in mapping.items()}
    if "conversations" in columns:
        return [_first_exchange(turns) for turns in columns["conversations"]]
    return [{role: _text(values[i], role) for role, values in columns.items()} for i in range(len(data))]


def _first_exchange(turns) -> dict[str, str]:
    """ShareGPT: the first user turn is the question, the reply after it the answer."""
    turns = turns or []
    for i, turn in enumerate(turns):
        if turn.get("from") in ("human", "user"):
            reply = turns[i + 1].get("value") if i + 1 < len(turns) else None
            return {"question": _text(turn.get("value")), "answer": _text(reply, "answer")}
    return {"question": ""}


def _text(value, role: str = "question") -> str | None:
    """Cell text; a missing question is empty (and dropped later), a missing answer stays None."""
    if value is None:
        return None if role == "answer" else ""
    return str(value)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (and offline mode is off); cheap to ask."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
