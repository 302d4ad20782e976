"""The trajectory store read back for training: `load_trajectories` reads the verified shards of a store (a
`datasets.Dataset` over the Parquet rows) and refuses what cannot be trained on, naming why. An *item* is one
(prompt, block) whose trajectory has an intermediate state; a trained row is a response whose blocks have one.
cllm_core/training/batches.py turns them into the tensors of a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import datasets
import pyarrow.compute as pc

from cllm_core.data.shards import ShardStore
from cllm_core.data.trajectories import SCHEMA_VERSION, check_schema
from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import JACOBI_FIELDS
from cllm_core.runtime.identity import digest

Item = tuple[int, int]  # (row, block)


@dataclass(frozen=True)
class TrajectoryData:
    """Rows to train on (repetitive ones removed unless asked for) and their (row, block) items."""

    rows: datasets.Dataset
    items: list[Item]
    n_tokens: int
    fingerprint: str  # the collection's config hash and the shards' checksums
    excluded_repetitive: int
    decoding: dict  # how the teacher decoded them: the collection's Jacobi settings (n_tokens, init, carry, ...)

    @cached_property
    def trained_rows(self) -> list[int]:
        """The rows with at least one block to train consistency on (Jacobi Forcing draws whole rows)."""
        return sorted({row for row, _ in self.items})


def load_trajectories(store_url: str, include_repetitive: bool = False, vocab_size: int | None = None,
                      tokenizer_fingerprint: str | None = None, teacher: str | None = None) -> TrajectoryData:
    """The store's verified shards as one dataset; any shard that is not verifiably complete is an error.

    `vocab_size` / `tokenizer_fingerprint` (of the model to train) catch trajectories from another tokenizer;
    `teacher` (its content identity) catches trajectories another model made, such as the teacher before it was
    retrained in place: a CLLM learns its own fixed points, not another model's.
    """
    store = ShardStore(store_url)
    collection = store.collection()
    if collection is None:
        raise UserError(f"no trajectories in {store_url} (no collection.json); run `cllm collect` first")
    shards = store.shards()
    if not shards:
        raise UserError(f"the shard store {store_url} holds no shards; run `cllm collect` first")
    for shard in shards:
        version = store.manifest(shard).get("schema_version")  # raw: a manifest of another version may lack fields
        if version != SCHEMA_VERSION:
            raise UserError(f"shard {shard} in {store_url} has trajectory schema version {version}, this code reads "
                            f"{SCHEMA_VERSION}; collect into a new store with this version")
    unverified = [s for s in shards if not store.is_done(s, collection["config_hash"])]
    if unverified:
        raise UserError(f"shards {unverified} in {store_url} are incomplete or damaged; run `cllm collect` "
                        "again to redo them")
    if teacher and collection.get("teacher") and collection["teacher"] != teacher:
        raise UserError(f"the trajectories in {store_url} were collected from another model (identity "
                        f"{collection['teacher']}) than the one to train ({teacher}), e.g. the teacher before it was "
                        "retrained in place; collect them again from this model (`cllm collect`)")
    held = collection.get("tokenizer")
    if tokenizer_fingerprint and held and held != tokenizer_fingerprint:
        raise UserError(f"the trajectories in {store_url} were collected with another tokenizer ({held}, this "
                        f"model's is {tokenizer_fingerprint}); collect them with this model")
    table = store.read(shards)
    check_schema(table.schema, store_url)
    if not table.num_rows:
        raise UserError(f"{store_url} holds no trajectories (every prompt was left out: see its shards' `unfinished` "
                        "and `departed`); collect again with a larger collect.jacobi.max_new_tokens or "
                        "collect.finished_only: false")
    sizes = pc.unique(table.column("n_tokens")).to_pylist()
    if len(sizes) != 1:
        raise UserError(f"{store_url} mixes block sizes {sizes}; train on one collection at a time")
    if vocab_size is not None:
        top = max(pc.max(pc.list_flatten(table.column(c))).as_py() or 0 for c in ("prompt_ids", "response_ids"))
        if top >= vocab_size:
            raise UserError(f"the trajectories in {store_url} hold token id {top}, beyond this model's vocabulary "
                            f"of {vocab_size}: they come from another tokenizer")
    repetitive = pc.sum(table.column("repetitive")).as_py() or 0
    if not include_repetitive:
        table = table.filter(pc.invert(table.column("repetitive")))
    items = [(row, block) for row, states in enumerate(table.column("block_states").to_pylist())
             for block, block_states in enumerate(states) if len(block_states) >= 2]
    if not items:
        left_out = f" ({repetitive} repetitive rows left out: finetune.include_repetitive to use them)" \
            if repetitive and not include_repetitive else ""
        raise UserError(f"the trajectories in {store_url} have no intermediate states to train on{left_out}")
    fingerprint = digest({"collection": collection["config_hash"],
                          "shards": [store.manifest(shard)["sha256"] for shard in shards]})
    decoding = {key: value for key, value in collection["config"].items() if key in JACOBI_FIELDS}
    return TrajectoryData(datasets.Dataset(table), items, sizes[0], fingerprint,
                          repetitive if not include_repetitive else 0, decoding)


def epoch_size(data: TrajectoryData, objective: str) -> int:
    """What one epoch sees once: the trained responses (jacobi_forcing) or blocks (cllm)."""
    return len(data.trained_rows) if objective == "jacobi_forcing" else len(data.items)


def label_ids(data: TrajectoryData, answers: dict[str, str], tokenize, eos: int) -> dict[int, list[int]]:
    """Ground-truth AR labels per row: the dataset's answer for the row's prompt id, tokenized, then EOS."""
    ids = data.rows["prompt_id"]
    missing = [pid for pid in ids if not answers.get(pid)]
    if missing:
        raise UserError(f"{len(missing)} trajectory prompts have no ground-truth answer (e.g. {missing[0][:12]}); "
                        "use ar_labels: teacher")
    return {row: tokenize(answers[pid]) + [eos] for row, pid in enumerate(ids)}
