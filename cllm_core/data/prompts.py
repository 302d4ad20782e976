"""Prompt text at the edge: read a prompt file, render it with the chat template, tokenize a batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from cllm_core.engine.errors import UserError
from cllm_core.runtime.files import parquet_schema


def read_prompts(path: str | Path, field: str = "question", limit: int | None = None) -> list[str]:
    """Prompts from a .jsonl file (one object per line, text in `field`), a .parquet file (column `field`,
    e.g. `prompt` of ingest's output) or a .txt file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = parquet_schema(path).names
        if field not in columns:
            raise UserError(f"{path} has no column {field!r} (columns: {', '.join(columns)})")
        return pq.read_table(path, columns=[field]).column(field).to_pylist()[:limit]
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            record = json.loads(line)
            if field not in record:
                raise UserError(f"{path}:{number} has no field {field!r} (fields: {', '.join(record)})")
            prompts.append(record[field])
    else:
        prompts = lines
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts")
    return prompts[:limit]


def render(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> str:
    """The prompt as the model expects it: the chat template when the tokenizer has one."""
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], device: torch.device | str = "cpu",
           chat: bool = True):
    """Left-padded (input_ids, attention_mask) for a batch of rendered prompts.

    A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS), as in training.
    """
    use_chat = chat and bool(tokenizer.chat_template)
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not use_chat)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)
