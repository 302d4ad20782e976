"""Stage 1, ingest: a prompt source -> `train.parquet` and `eval.parquet` of rendered, deduplicated prompts.

Every source goes through `datasets` (hub ids and local files alike) and is reduced to records with a
`question` and an optional `answer` (and `context`), by a field mapping that presets fill in. Each prompt is
rendered with a named template or the tokenizer's chat template, hashed into a stable `prompt_id`, counted in
tokens, and dropped when too long. The two files and a manifest appear together, or not at all.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cllm_core.data.sources import IngestError, is_local, load_records
from cllm_core.data.templates import CHAT, TEMPLATES, render_template
from cllm_core.runtime.config import IngestConfig, ModelConfig
from cllm_core.runtime.files import publish_dir
from cllm_core.runtime.identity import digest, file_digest

SCHEMA_VERSION = 1
PROMPT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("answer", pa.string()),
])


def prompt_id(prompt: str) -> str:
    """Stable id of a rendered prompt: the first 16 hex digits of its sha256."""
    return digest(prompt.encode("utf-8"))


def ingest(config: IngestConfig, tokenizer_config: ModelConfig, out_dir: str | Path, log=print) -> dict:
    """Write `out_dir/{train,eval}.parquet` and `manifest.json`; returns the manifest (counts and choices)."""
    from cllm_core.runtime.models import load_tokenizer

    preset = config.resolved_preset()
    template = config.template or preset.template
    eval_split = config.eval_split or (None if is_local(config.source) else preset.eval_split)
    splits = load_records(config, preset, eval_split, log)
    tokenizer = load_tokenizer(tokenizer_config)
    if template == CHAT and not tokenizer.chat_template:
        raise IngestError(f"template 'chat' needs a chat template, and the tokenizer of "
                          f"{tokenizer_config.name_or_path} has none; pick one of {', '.join(TEMPLATES)}")
    if eval_split is None:
        splits = _seeded_split(splits["train"], config.eval_fraction, config.seed)
    tables, counts = {}, {"template": template, "eval_split": eval_split or f"seeded {config.eval_fraction:g}"}
    seen: set[str] = set()
    for name in ("eval", "train"):  # eval first: a prompt in both splits stays out of train
        limit = config.max_eval if name == "eval" else config.max_train
        rows, dropped = _rows(splits[name], template, tokenizer, config, seen, limit)
        counts |= {f"{name}_rows": len(rows)} | {f"{name}_{key}": value for key, value in dropped.items()}
        tables[name] = pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)
    too_long = counts["train_too_long"] + counts["eval_too_long"]
    if not counts["train_rows"] and too_long:
        raise IngestError(f"every prompt is longer than max_prompt_tokens={config.max_prompt_tokens} ({too_long} "
                          "dropped); raise max_prompt_tokens")
    for name in ("train", "eval"):
        if not counts[f"{name}_rows"]:
            raise IngestError(_empty_split(name, counts, config, seeded=eval_split is None))
    manifest = {"schema_version": SCHEMA_VERSION, "config": config.model_dump(mode="json"),
                "tokenizer": tokenizer_config.model_dump(mode="json"), **counts}
    _write(Path(out_dir), tables, manifest, template)
    return manifest


def manifest_counts(manifest: dict) -> dict[str, int]:
    """The manifest's row and drop counts per split (`train_rows`, `eval_duplicates`, ...)."""
    return {key: value for key, value in manifest.items() if key.startswith(("train_", "eval_"))
            and isinstance(value, int)}


def _seeded_split(records: list[dict], eval_fraction: float, seed: int) -> dict[str, list[dict]]:
    order = random.Random(seed).sample(range(len(records)), len(records))
    held_out = set(order[:max(1, min(round(eval_fraction * len(records)), len(records) - 1))])  # both get one
    return {"train": [r for i, r in enumerate(records) if i not in held_out],
            "eval": [r for i, r in enumerate(records) if i in held_out]}


def _rows(records, template, tokenizer, config, seen, limit) -> tuple[list[dict], dict[str, int]]:
    """Rendered rows in source order, skipping empties, duplicates (of `seen` too) and over-long prompts."""
    rows, dropped = [], {"empty": 0, "duplicates": 0, "too_long": 0}
    texts = [_render(template, record, tokenizer, config.system_prompt) if record["question"].strip() else None
             for record in records]
    present = [t for t in texts if t is not None]
    lengths = iter(tokenizer(present, add_special_tokens=template != CHAT)["input_ids"] if present else [])
    for record, text in zip(records, texts):
        if text is None:
            dropped["empty"] += 1
            continue
        tokens, key = len(next(lengths)), prompt_id(text)
        if key in seen:
            dropped["duplicates"] += 1
        elif tokens > config.max_prompt_tokens:
            dropped["too_long"] += 1
        elif limit is None or len(rows) < limit:
            seen.add(key)
            rows.append({"prompt_id": key, "source": config.source, "question": record["question"], "prompt": text,
                         "prompt_tokens": tokens, "answer": record.get("answer")})
    return rows, dropped


def _empty_split(name: str, counts: dict, config: IngestConfig, seeded: bool) -> str:
    """One line on a split that came out empty, and what to change."""
    kept = counts["train_rows"] + counts["eval_rows"]
    dropped = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind in ("empty", "duplicates", "too_long")
                        if (n := counts[f"train_{kind}"] + counts[f"eval_{kind}"]))
    after = f" after dropping {dropped}" if dropped else ""
    if seeded and kept < 2:
        return (f"{config.source} has {kept} usable prompt{'' if kept == 1 else 's'}{after}: need at least 2 distinct "
                "prompts, one to train and one to evaluate; add prompts")
    if seeded:
        return (f"no {name} prompts are left from {config.source}{after}; add distinct prompts or change "
                f"eval_fraction ({config.eval_fraction:g})")
    return (f"no {name} prompts are left from {config.source}{after}; check the split names, field mapping and "
            "max_prompt_tokens")


def _render(template: str, record: dict, tokenizer, system: str | None = None) -> str:
    if template == CHAT:
        system_message = [] if system is None else [{"role": "system", "content": system}]
        return tokenizer.apply_chat_template([*system_message, {"role": "user", "content": record["question"]}],
                                             tokenize=False, add_generation_prompt=True)
    return render_template(template, record)


def _write(out_dir: Path, tables: dict[str, pa.Table], manifest: dict, template: str) -> None:
    """Both Parquet files and the manifest (with their sha256), published together."""
    metadata = {"cllm.schema_version": str(SCHEMA_VERSION), "cllm.template": template}
    with publish_dir(out_dir) as staging:
        for name, table in tables.items():
            pq.write_table(table.replace_schema_metadata(metadata), staging / f"{name}.parquet", compression="zstd")
            manifest[f"{name}_sha256"] = file_digest(staging / f"{name}.parquet")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
