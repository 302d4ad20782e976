"""The shard store: `shard-NNNNN.parquet` files, each trusted only through the manifest written after it.

A shard is written to a temporary name, flushed to disk, renamed into place, and only then described by
`shard-NNNNN.json` (rows, sha256, config hash, teacher fingerprint, schema version, timings). A shard counts
as done when its manifest matches the collection's config and the file's size and sha256 match the manifest;
anything else (no manifest, a missing, truncated or altered file, another config) is redone. The store is a
local path or any fsspec URL (s3://, gs://, memory://); `collection.json` pins the config of a store.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from dataclasses import dataclass
from functools import cached_property

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cllm_core.data.trajectories import SCHEMA_VERSION, check_schema
from cllm_core.engine.errors import UserError
from cllm_core.runtime.identity import digest


class ShardsFailed(RuntimeError):
    """Some shards failed while the rest were collected; the message says which and how to resume."""


@dataclass(frozen=True)
class ShardStore:
    """A directory of shards, local or remote."""

    url: str

    @cached_property
    def _resolved(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.url)
        return fs, root.rstrip("/")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._resolved[0]

    @property
    def root(self) -> str:
        return self._resolved[1]

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def pin(self, collection: dict) -> None:
        """Record the store's collection config, or refuse one that differs from what it already holds."""
        fs, path = self.fs, self.path("collection.json")
        if fs.exists(path):
            held = json.loads(fs.cat_file(path))
            if held["config_hash"] != collection["config_hash"]:
                raise UserError(f"the shard store {self.url} holds a collection with another config (differs in: "
                                f"{_differences(held, collection)}); use a new store (e.g. another work dir) or "
                                "delete this one to start over")
            return
        try:
            fs.makedirs(self.root, exist_ok=True)
            self._write_atomically("collection.json", _json(collection))
        except OSError as error:
            raise UserError(f"the shard store {self.url} is not writable ({error.strerror or error})") from None

    def collection(self) -> dict | None:
        """The pinned collection record (config, teacher, tokenizer, hash), or None for an empty store."""
        path = self.path("collection.json")
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def shards(self) -> list[int]:
        """The shard numbers that have a manifest, in order."""
        names = (name.rsplit("/", 1)[-1] for name in self.fs.glob(self.path("shard-*.json")))
        return sorted(int(name[len("shard-"):-len(".json")]) for name in names)

    def is_done(self, shard: int, config_hash: str) -> bool:
        """Whether the shard's file and manifest are complete, intact, and from this config."""
        fs, manifest_path = self.fs, self.path(manifest_name(shard))
        if not fs.exists(manifest_path):
            return False
        manifest = json.loads(fs.cat_file(manifest_path))
        if manifest.get("config_hash") != config_hash or manifest.get("schema_version") != SCHEMA_VERSION:
            return False
        data_path = self.path(shard_name(shard))
        if not fs.exists(data_path) or fs.size(data_path) != manifest["bytes"]:
            return False
        return digest(fs.cat_file(data_path), length=64) == manifest["sha256"]  # a file's whole sha256

    def manifest(self, shard: int) -> dict:
        return json.loads(self.fs.cat_file(self.path(manifest_name(shard))))

    def write(self, shard: int, table: pa.Table, manifest: dict) -> dict:
        """Publish the shard, then its manifest (completed with rows, bytes and sha256); returns the manifest."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        manifest_path = self.path(manifest_name(shard))
        if self.fs.exists(manifest_path):
            self.fs.rm(manifest_path)  # a stale manifest must never vouch for the new file
        self._write_atomically(shard_name(shard), data)
        manifest = manifest | {"shard": shard, "rows": table.num_rows, "bytes": len(data),
                               "sha256": digest(data, length=64), "schema_version": SCHEMA_VERSION}
        self._write_atomically(manifest_name(shard), _json(manifest))
        return manifest

    def read(self, shards: list[int], columns: list[str] | None = None) -> pa.Table:
        """The given shards as one table, each checked against the trajectory schema; only `columns` if named."""
        tables = []
        for shard in shards:
            with self.fs.open(self.path(shard_name(shard)), "rb") as stream:
                check_schema(pq.read_schema(stream), self.path(shard_name(shard)))
                tables.append(pq.read_table(stream, columns=columns))
        return pa.concat_tables(tables)

    def _write_atomically(self, name: str, data: bytes) -> None:
        fs, final = self.fs, self.path(name)
        temporary = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            if isinstance(fs, LocalFileSystem):
                with open(temporary, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temporary, final)
            else:
                with fs.open(temporary, "wb") as stream:
                    stream.write(data)
                fs.mv(temporary, final)
        finally:
            if fs.exists(temporary):  # a failed write leaves nothing behind (a kill -9 can: readers skip dotfiles)
                fs.rm(temporary)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def manifest_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def _differences(held: dict, collection: dict) -> str:
    """What differs between two collection records, in words: config fields, then the teacher, precision,
    tokenizer and prompts (a teacher retrained or replaced in place has another content identity)."""
    fields = sorted(set(held["config"]) | set(collection["config"]))
    changed = [k for k in fields if held["config"].get(k) != collection["config"].get(k)]
    if held.get("teacher") != collection.get("teacher"):
        changed.append("teacher (its files changed since: retrained or replaced)")
    changed += [what for key, what in (("precision", "precision"), ("tokenizer", "tokenizer"),
                                       ("prompts_sha256", "prompts")) if held.get(key) != collection.get(key)]
    if ("reference" in held) != ("reference" in collection):
        how = "without" if "reference" in collection else "with"
        changed.append(f"collect.reference (the store was collected {how} one; a second round sets it unless "
                       "second_round.teacher_fixed_points is false)")
    elif held.get("reference") != collection.get("reference"):
        changed.append("the reference store's content")
    return ", ".join(changed) or "how the collection is identified (collected by another version)"


def _json(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
