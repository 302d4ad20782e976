"""Named prompt templates: the paper's per-dataset prompts (docs/design/cllm_reference.md, "Prompt templates").

A template is a format string over the record's fields after field mapping (`question`, and `context` for
Spider's schema). `chat` is not a format string: it asks for the tokenizer's own chat template instead.
"""

from __future__ import annotations

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config.catalogue import CHAT, TEMPLATES


def render_template(name: str, record: dict[str, str]) -> str:
    """The prompt text of one record under the named template (not `chat`: that needs a tokenizer)."""
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; choose one of {', '.join([*TEMPLATES, CHAT])}")
    return TEMPLATES[name].format_map(_Fields(record))


class _Fields(dict):
    """Missing optional fields (Spider's `context`) render as empty text."""

    def __missing__(self, key: str) -> str:
        if key == "question":
            raise KeyError("question")
        return ""
