"""Stage 2, collect: teacher + `prompts/train.parquet` -> trajectory shards, batched and KV-cached.

Prompts are assigned to shards by position (shard k holds prompts k*shard_size ... (k+1)*shard_size - 1), so
the assignment never changes between runs. Each prompt's initial guesses are seeded from its id, so its
trajectory does not depend on which batch or shard it lands in. `collection_record` hashes everything that
decides a shard's content; a store only ever holds shards of one such hash.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cllm_core.data.prompts import encode
from cllm_core.data.shards import ShardStore
from cllm_core.data.trajectories import TRAJECTORY_SCHEMA, trajectory_row
from cllm_core.engine.baselines import ar_generate
from cllm_core.engine.errors import UserError
from cllm_core.engine.inputs import resolve_eos
from cllm_core.engine.jacobi import jacobi_generate
from cllm_core.engine.outputs import BlockTrajectory
from cllm_core.runtime.config import CollectConfig, ModelConfig
from cllm_core.runtime.files import parquet_schema
from cllm_core.runtime.identity import digest, file_digest
from cllm_core.runtime.records import CollectionPlan, ShardManifest

PROMPT_COLUMNS = ("prompt_id", "prompt")
BATCH_FORWARD = "packed where the model allows"
"""How a batch meets the model (cllm_core.engine.forwards); below fp32 it changes the rounding, so it is in the
record."""
MASK_WINDOW = 128
"""Context tokens a masked state's filling is drawn from (Jacobi Forcing's progressive masking uses the last 128)."""


def read_prompt_table(path: str | Path, limit: int | None = None) -> tuple[pa.Table, bool]:
    """The prompts (id and rendered text) and whether they were rendered with a chat template."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist; run `cllm ingest` first")
    schema = parquet_schema(path)
    missing = [c for c in PROMPT_COLUMNS if c not in schema.names]
    if missing:
        raise UserError(f"{path} is not a prompts file from `cllm ingest`: no column {missing[0]!r} "
                        f"(columns: {', '.join(schema.names)})")
    table = pq.read_table(path, columns=list(PROMPT_COLUMNS))
    return (table.slice(0, limit) if limit else table), rendered_with_chat(schema)


def rendered_with_chat(schema) -> bool:
    """Whether `cllm ingest` rendered a prompts file's prompts with the chat template (its schema's metadata)."""
    return (schema.metadata or {}).get(b"cllm.template") == b"chat"


def shard_count(prompts: int, shard_size: int) -> int:
    return math.ceil(prompts / shard_size)


def collection_record(config: CollectConfig, model: ModelConfig, prompts_path: str | Path,
                      tokenizer: str | None = None, precision: str = "fp32") -> dict:
    """Everything that decides shard content, and its hash (`config_hash`); `tokenizer` is the teacher's
    tokenizer fingerprint, which fine-tuning checks its own against; `precision` is the resolved name (fp32,
    bf16, fp16) the teacher decodes in. The teacher is its content identity: not its path, not its device."""
    from cllm_core.runtime.models import model_identity

    kept = config.model_dump(exclude={"jacobi", "batch_size", "devices", "max_repetitive", "reference"}
                             | ({"finished_only"} if not config.finished_only else set())
                             | ({"noise"} if config.noise == "jacobi" else set()))  # old stores stay valid
    content = config.jacobi.model_dump() | kept | _rounding(config, model, precision)  # flat: old stores stay valid
    record = {"config": content, "precision": precision, "teacher": model_identity(model), "tokenizer": tokenizer,
              "prompts_sha256": file_digest(prompts_path)}
    if config.reference:  # its content decides which rows are kept, not its path
        record["reference"] = checked_reference(config.reference, tokenizer)
    record["config_hash"] = digest(record)
    return record


def _rounding(config: CollectConfig, model: ModelConfig, precision: str) -> dict:
    """What changes trajectories only through rounding. On a CPU in fp32 the batch, kernel and device change speed,
    not a token (tested); in bf16/fp16, or on a GPU in any precision (TF32 matmuls, shape-dependent kernels), the
    rounding of a logit depends on the batch's shape (padding, matmul tiling), the attention kernel and the kind
    of device, and near-ties flip the argmax."""
    from cllm_core.runtime.models import resolve_device

    kinds = sorted({(resolve_device(device) if device == "auto" else torch.device(device)).type
                    for device in config.devices or [model.device]})
    if precision == "fp32" and kinds == ["cpu"]:
        return {}
    return {"batch_size": config.batch_size, "device_kinds": kinds, "attn_implementation": model.attn_implementation,
            "batch_forward": BATCH_FORWARD}


@functools.lru_cache(maxsize=2)
def _teacher(model: ModelConfig, identity: str, precision: str):
    """The loaded teacher, kept while its identity holds (a teacher retrained in place is loaded anew)."""
    from cllm_core.runtime.models import load_model, load_tokenizer
    from cllm_core.runtime.precision import DTYPES

    return load_model(model, DTYPES[precision]), load_tokenizer(model)


def collect_shard(config: CollectConfig, model: ModelConfig, prompts_path: str | Path, store: ShardStore,
                  shard: int, collection: dict, log: Callable[[str], None] = print) -> ShardManifest:
    """Collect one shard's trajectories and publish it, unless the store already holds it verified; returns
    its manifest (with throughput figures). `collection` is the plan's collection record."""
    if store.is_done(shard, collection["config_hash"]):  # another worker or an earlier attempt finished it
        return _skipped(store, shard, log)
    table, chat = read_prompt_table(prompts_path, config.limit)
    part = table.slice(shard * config.shard_size, config.shard_size).to_pylist()
    if not part:
        raise UserError(f"shard {shard} is empty: the prompts make {shard_count(len(table), config.shard_size)}")
    lm, tokenizer = _teacher(model, collection["teacher"], collection["precision"])
    eos = resolve_eos(lm, None)
    start, seen = time.perf_counter(), len(part)
    if config.noise == "masked":
        rows, forwards = _masked_rows(lm, tokenizer, part, chat, config, eos)
    else:
        if config.finished_only:
            part = ending_within_budget(lm, tokenizer, part, chat, config, eos)
        rows, forwards = _jacobi_rows(lm, tokenizer, part, chat, config, eos)
    departed = 0
    if config.reference:
        responses = reference_responses(config.reference, collection["reference"], store.url)
        rows, departed = agreeing(rows, responses)
    seconds = time.perf_counter() - start
    tokens = sum(len(row["response_ids"]) for row in rows)
    passes = [p for row in rows for p in row["block_passes"]]
    figures = {"seconds": seconds, "prompts_per_s": len(rows) / seconds, "tokens_per_s": tokens / seconds,
               "tokens": tokens, "forwards": forwards, "mean_passes_per_block": sum(passes) / max(len(passes), 1),
               "repetitive": sum(row["repetitive"] for row in rows), "unfinished": seen - len(rows) - departed,
               "departed": departed}
    manifest = ShardManifest.from_json(store.write(shard, pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA), {
        "config_hash": collection["config_hash"], "teacher": collection["teacher"], **figures}))
    left_out = f", {manifest.unfinished} left out (no EOS within the budget)" if config.finished_only else ""
    if config.reference:
        left_out += f", {manifest.departed} left out (fixed points not the reference's response)"
    states = ("masked states (no Jacobi pass)" if config.noise == "masked"
              else f"{manifest.mean_passes_per_block:.2f} passes per block")
    log(f"shard {shard}: {len(rows)} prompts, {tokens} tokens in {seconds:.1f} s ({manifest.prompts_per_s:.2f} "
        f"prompts/s, {states}, {manifest.repetitive} repetitive{left_out})")
    return manifest


def checked_reference(url: str, tokenizer: str | None) -> dict:
    """The reference store's identity, once its every shard is verified (as training verifies its data) and its
    tokenizer is this collection's: responses in other token ids would all depart."""
    store, identity = ShardStore(url), reference_identity(url)
    held = store.collection()  # present: reference_identity refuses a store without one
    broken = [shard for shard in store.shards() if not store.is_done(shard, identity["config_hash"])]
    if broken:
        raise UserError(f"collect.reference {url}: shards {broken} are unfinished, altered or of another collection; "
                        "finish that collection (rerun it) before collecting against it")
    if tokenizer and held.get("tokenizer") and held["tokenizer"] != tokenizer:
        raise UserError(f"collect.reference {url} was collected with another tokenizer ({held['tokenizer']}, this "
                        f"collection's is {tokenizer}): its responses are not comparable")
    return identity


def reference_identity(url: str) -> dict:
    """What identifies a reference store's content: its collection's hash and its shards' sha256, in order (read off
    the manifests: cheap enough for every shard to check)."""
    store = ShardStore(url)
    held = store.collection()
    if held is None or not store.shards():
        raise UserError(f"collect.reference {url} holds no collected trajectories: collect them first (a second "
                        "round's reference is round 1's store)")
    return {"config_hash": held["config_hash"],
            "shards_sha256": digest([store.manifest(shard)["sha256"] for shard in store.shards()])}


def reference_responses(url: str, identity: dict, store: str) -> dict[str, list[int]]:
    """prompt id -> response ids in the reference store, which must still be what `identity` names (the collection
    into `store` was planned against it)."""
    if reference_identity(url) != identity:
        raise UserError(f"collect.reference {url} changed since the collection into {store} was planned (collected "
                        f"again?): delete {store}, whose shards the old reference chose, or collect into another "
                        "store")
    return _responses(url, identity["shards_sha256"])


@functools.lru_cache(maxsize=2)
def _responses(url: str, shards_sha256: str) -> dict[str, list[int]]:
    store = ShardStore(url)
    table = store.read(store.shards(), columns=["prompt_id", "response_ids"])
    return dict(zip(table.column("prompt_id").to_pylist(), table.column("response_ids").to_pylist()))


def agreeing(rows: list[dict], responses: dict[str, list[int]]) -> tuple[list[dict], int]:
    """The rows whose response is their prompt's reference response, and how many departed (or had none)."""
    kept = [row for row in rows if responses.get(row["prompt_id"]) == row["response_ids"]]
    return kept, len(rows) - len(kept)


def _seed(prompt: dict, config: CollectConfig) -> int:
    return int(prompt["prompt_id"][:8], 16) ^ config.jacobi.seed


def _jacobi_rows(lm, tokenizer, part: list[dict], chat: bool, config: CollectConfig,
                 eos: frozenset[int]) -> tuple[list[dict], int]:
    """Trajectory rows from the teacher's batched Jacobi decoding, and the forwards it took."""
    rows, forwards = [], 0
    for first in range(0, len(part), config.batch_size):
        batch = part[first:first + config.batch_size]
        ids, mask = encode(tokenizer, [p["prompt"] for p in batch], lm.device, chat)
        seeds = [_seed(p, config) for p in batch]
        out = jacobi_generate(lm, ids, mask, **config.jacobi.arguments() | {"seed": seeds}, return_trajectories=True)
        forwards += out.stats.forwards
        for r, prompt in enumerate(batch):
            response = out.response(r, ids.shape[1])
            finished = bool(response) and response[-1] in eos
            rows.append(trajectory_row(prompt["prompt_id"], ids[r][mask[r].bool()].tolist(), response,
                                       out.trajectories[r], config.jacobi.n_tokens, finished))
    return rows, forwards


def _masked_rows(lm, tokenizer, part: list[dict], chat: bool, config: CollectConfig,
                 eos: frozenset[int]) -> tuple[list[dict], int]:
    """Trajectory rows whose noisy states are masked, not decoded (`collect.noise: masked`): one batched AR
    pass gives each greedy response; with `finished_only` a response that runs out of budget is left out."""
    rows, forwards = [], 0
    for first in range(0, len(part), config.batch_size):
        batch = part[first:first + config.batch_size]
        ids, mask = encode(tokenizer, [p["prompt"] for p in batch], lm.device, chat)
        out = ar_generate(lm, ids, mask, max_new_tokens=config.jacobi.max_new_tokens, eos_token_id=sorted(eos))
        forwards += out.stats.forwards
        for r, prompt in enumerate(batch):
            response = out.response(r, ids.shape[1])
            finished = bool(response) and response[-1] in eos
            if config.finished_only and not finished:
                continue
            prompt_ids = ids[r][mask[r].bool()].tolist()
            blocks = masked_blocks(prompt_ids, response, config.jacobi.n_tokens, random.Random(_seed(prompt, config)))
            rows.append(trajectory_row(prompt["prompt_id"], prompt_ids, response, blocks, config.jacobi.n_tokens,
                                       finished))
    return rows, forwards


def masked_blocks(prompt: list[int], response: list[int], n_tokens: int, rng: random.Random,
                  window: int = MASK_WINDOW) -> list[BlockTrajectory]:
    """Jacobi Forcing's model-free noisy states (its progressive masking): for each block of the response and
    every k below the block's length, a state that keeps the fixed point's first k tokens and fills the rest
    with tokens drawn from the `window` tokens before the block, the first of them unlike the fixed point's
    there, so the state's noise is exactly (length - k) / length; then the fixed point. Every noise level the
    schedule asks for is there. No pass made them: `passes` is 0."""
    blocks = []
    for start in range(0, len(response), n_tokens):
        fixed_point = response[start:start + n_tokens]
        context = (prompt + response[:start])[-window:]
        states = []
        for k in range(len(fixed_point)):
            unlike = [t for t in context if t != fixed_point[k]]
            if not unlike:  # a context of one repeated token: no state has its first wrong token at k
                continue
            fill = [rng.choice(context) for _ in range(len(fixed_point) - k - 1)]
            states.append(fixed_point[:k] + [rng.choice(unlike)] + fill)
        blocks.append(BlockTrajectory(states + [list(fixed_point)], list(fixed_point), 0))
    return blocks


def ending_within_budget(lm, tokenizer, prompts: list[dict], chat: bool, config: CollectConfig,
                         eos: frozenset[int]) -> list[dict]:
    """The prompts whose greedy response ends with EOS inside `max_new_tokens`, shortest response first.

    One batched AR pass (`ar_generate`, far cheaper than Jacobi from random guesses) finds them; a
    response that runs to the budget would cost the most passes and teach a truncated answer. Sorting by length
    puts responses of similar length in a batch, so no batch waits long on one straggler. Each prompt's
    trajectory does not depend on its batch (its guesses are seeded by its id; in fp32 not a token changes)."""
    if not eos:
        raise UserError("collect.finished_only needs the teacher's EOS token (its generation config names none); "
                        "set finished_only: false")
    lengths = {}
    for first in range(0, len(prompts), config.batch_size):
        batch = prompts[first:first + config.batch_size]
        ids, mask = encode(tokenizer, [p["prompt"] for p in batch], lm.device, chat)
        out = ar_generate(lm, ids, mask, max_new_tokens=config.jacobi.max_new_tokens, eos_token_id=sorted(eos))
        for r, prompt in enumerate(batch):
            response = out.response(r, ids.shape[1])
            if response and response[-1] in eos:
                lengths[prompt["prompt_id"]] = len(response)
    return sorted((p for p in prompts if p["prompt_id"] in lengths), key=lambda p: lengths[p["prompt_id"]])


def plan(config: CollectConfig, model: ModelConfig, prompts_path: str | Path, store_url: str,
         precision: str = "fp32") -> CollectionPlan:
    """Pin the store to this collection and sort its shards into done (verified) and to do.

    The teacher's tokenizer is loaded here once, so a teacher that cannot be found is one clear error before
    any shard starts, not a failure (and retries) in every shard.
    """
    from cllm_core.runtime.models import load_tokenizer, tokenizer_fingerprint
    from cllm_core.runtime.precision import resolve

    table, _ = read_prompt_table(prompts_path, config.limit)
    tokenizer = tokenizer_fingerprint(load_tokenizer(model))
    resolved = resolve(precision, model.device).name  # every shard decodes in it, whichever device takes it
    record, store = collection_record(config, model, prompts_path, tokenizer, resolved), ShardStore(store_url)
    store.pin(record)
    shards = range(shard_count(len(table), config.shard_size))
    done = tuple(shard for shard in shards if store.is_done(shard, record["config_hash"]))
    return CollectionPlan(record, len(table), len(shards), done, tuple(shard for shard in shards if shard not in done))


def collect(config: CollectConfig, model: ModelConfig, prompts_path: str | Path, store_url: str,
            log: Callable[[str], None] = print, precision: str = "fp32") -> list[ShardManifest]:
    """Collect every shard not already done, one after another (flows fan the same shards out)."""
    work, store = plan(config, model, prompts_path, store_url, precision), ShardStore(store_url)
    return [_skipped(store, shard, log) if shard in work.done
            else collect_shard(config, model, prompts_path, store, shard, work.collection, log)
            for shard in range(work.shards)]


def _skipped(store: ShardStore, shard: int, log: Callable[[str], None]) -> ShardManifest:
    log(f"shard {shard}: done, skipped")
    return ShardManifest.from_json(store.manifest(shard))
