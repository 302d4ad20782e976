"""The trajectory record: one row per prompt, its tokens stored once, one pyarrow schema with a version.

A row holds the prompt's ids, the teacher's greedy response (the concatenated fixed points) and, per block
of `n_tokens` response positions, every Jacobi state from the initial guess to the fixed point and the
number of passes the block took. Block b's fixed point is `response_ids[b * n_tokens : (b + 1) * n_tokens]`,
so no prefix is copied per block. Degenerate responses are flagged, never dropped (notes §1.5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from cllm_core.engine.errors import UserError

if TYPE_CHECKING:  # a type only: reading shards needs no torch
    from cllm_core.engine.outputs import BlockTrajectory

SCHEMA_VERSION = 1
TOKENS = pa.list_(pa.int32())
TRAJECTORY_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt_ids", TOKENS, nullable=False),
    pa.field("response_ids", TOKENS, nullable=False),
    pa.field("block_states", pa.list_(pa.list_(TOKENS)), nullable=False),  # (blocks, states, <= n_tokens)
    pa.field("block_passes", pa.list_(pa.int32()), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("finished", pa.bool_(), nullable=False),  # stopped at EOS, not at max_new_tokens
    pa.field("repetitive", pa.bool_(), nullable=False),
], metadata={"cllm.schema_version": str(SCHEMA_VERSION)})


def trajectory_row(prompt_id: str, prompt_ids: list[int], response: list[int], blocks: list[BlockTrajectory],
                   n_tokens: int, finished: bool) -> dict:
    """One record; the response is checked to be the concatenation of the blocks' fixed points."""
    if [t for block in blocks for t in block.fixed_point] != response:
        raise UserError(f"prompt {prompt_id}: the blocks' fixed points do not spell the response")
    return {"prompt_id": prompt_id, "prompt_ids": prompt_ids, "response_ids": response,
            "block_states": [block.states for block in blocks], "block_passes": [block.passes for block in blocks],
            "n_tokens": n_tokens, "finished": finished, "repetitive": repetitive(response)}


def check_schema(schema: pa.Schema, where: str) -> None:
    """Refuse a table that is not this version of the trajectory schema, naming the first column that differs."""
    version = (schema.metadata or {}).get(b"cllm.schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise UserError(f"{where} has trajectory schema version {version}, this code reads {SCHEMA_VERSION}")
    for expected in TRAJECTORY_SCHEMA:
        if expected.name not in schema.names:
            raise UserError(f"{where} has no column {expected.name!r}")
        if not schema.field(expected.name).type.equals(expected.type):
            raise UserError(f"{where}: column {expected.name!r} is {schema.field(expected.name).type}, "
                            f"expected {expected.type}")


def repetitive(tokens: list[int], run: int = 10, max_period: int = 8) -> bool:
    """Degenerate repetition: one token `run` times in a row (the paper's check), or a pattern of up to
    `max_period` tokens repeating back to back over at least max(run, 3 periods) tokens."""
    for period in range(1, max_period + 1):
        need, streak = max(run, 3 * period), 0
        for i in range(period, len(tokens)):
            streak = streak + 1 if tokens[i] == tokens[i - period] else 0
            if streak + period >= need:
                return True
    return False
