"""What a profile may name: the dataset presets (`ingest.source` / `ingest.preset`: where a dataset lives, which
columns mean what, how its prompts are rendered and its answers judged) and the prompt templates
(`ingest.template`; the paper's per-dataset prompts, docs/design/cllm_reference.md, "Prompt templates"). The config
validates against them; cllm_core/data reads and renders with them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[3]  # cllm_core/runtime/config/catalogue.py
SHARED_GSM8K = CHECKOUT.parent / "shared" / "datasets" / "gsm8k"
"""The offline copy of GSM8K beside a checkout (`../shared/datasets/gsm8k`), read when the hub is unreachable."""


@dataclass(frozen=True)
class Preset:
    """How to read one kind of dataset: where it lives, which columns mean what, how to render it."""

    dataset: str | None = None
    subset: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    template: str = "plain"
    eval_split: str | None = None
    fallback: Path | None = None  # a local copy of the dataset for when the hub is unreachable
    check: str = "exact"  # how evaluation judges an answer (answers.CHECKS): the text, or math's `#### N`


PRESETS: dict[str, Preset] = {
    "gsm8k": Preset("openai/gsm8k", "main", {"question": "question", "answer": "answer"}, "gsm8k", "test",
                    fallback=Path(os.environ.get("CLLM_GSM8K_DIR", SHARED_GSM8K)), check="math"),
    "spider": Preset("xlangai/spider", None, {"question": "question", "answer": "query", "context": "db_id"},
                     "spider", "validation"),
    "code-python": Preset("code-search-net/code_search_net", "python",
                          {"question": "func_documentation_string", "answer": "func_code_string"}, "code", "test"),
    "sharegpt": Preset("anon8231489123/ShareGPT_Vicuna_unfiltered", None, {"conversations": "conversations"}, "chat"),
    "synthetic-math": Preset(None, None, {"question": "question", "answer": "answer"}, "gsm8k", "eval",
                             check="math"),
}


INSTRUCTION = "### Instruction:\n{instruction}\n### Response:\n"

TEMPLATES: dict[str, str] = {
    "gsm8k": "Question:\n{question}\nAnswer:\nLet's think step by step.\n",
    "spider": INSTRUCTION.format(instruction="Could you translate the following question into SQL. Please only "
                                 "generate SQL, don't include explanation in the answer. Database: {context}\n"
                                 "Question: {question}"),
    "code": INSTRUCTION.format(instruction="Please generate code based on the following doc:\n{question}"),
    "plain": "{question}",
}
CHAT = "chat"
