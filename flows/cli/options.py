"""A command's options read from the configs: every field of the profile sections a command names becomes an
option (its description the help, its type the option's, a Literal its choices, a mapping KEY=VALUE items), so
a new config field is one edit in cllm_core/runtime/config/."""

from __future__ import annotations

import inspect
import types
from typing import Annotated, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.markup import escape

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import Profile

OPTION_NAMES = {"model.name_or_path": "model", "ingest.fields": "field",
                "evaluate.methods": "method", "finetune.lora.rank": "lora_rank", "finetune.lora.alpha": "lora_alpha",
                "finetune.lora.dropout": "lora_dropout", "finetune.lora.target_modules": "lora_target"}
"""Options whose name is not their field's: the usual flags, and the singular of a repeatable option."""


PAIRS = {"ingest.fields": "ROLE=COLUMN"}
"""How a mapping's items are written (KEY=VALUE unless named here)."""


ARGUMENTS = {"ingest.source"}
"""Fields given as positional arguments."""


def section_options(path: str) -> list[tuple[str, inspect.Parameter]]:
    """(dotted field path, typer parameter) for every field of the profile section at `path`, nested models
    flattened: `collect` gives collect.n_tokens as --n-tokens."""
    model = _section_model(path)
    found = []
    for field, info in model.model_fields.items():
        dotted = f"{path}.{field}"
        kind = bare_type(info.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found += section_options(dotted)
            continue
        name = OPTION_NAMES.get(dotted, field)
        choices = _choices(kind)
        help_text = escape((info.description or "") + (f" [{'|'.join(choices)}]" if choices else ""))  # no markup
        if dotted in ARGUMENTS:
            parameter = option_parameter(name, _cli_type(kind), typer.Argument(help=help_text, show_default=False))
        else:
            option = [f"--{name.replace('_', '-')}"]
            if _cli_type(kind) is bool:
                option = [f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"]
            parameter = option_parameter(name, _cli_type(kind),
                                         typer.Option(*option, help=help_text, show_default=False))
        found.append((dotted, parameter))
    return found


def _section_model(path: str) -> type[BaseModel]:
    model: type[BaseModel] = Profile
    for part in path.split("."):
        model = bare_type(model.model_fields[part].annotation)
    return model


def bare_type(annotation):
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _choices(kind) -> list[str]:
    if get_origin(kind) is Literal:
        return [str(choice) for choice in get_args(kind)]
    if get_origin(kind) is list:
        return _choices(get_args(kind)[0])
    return []


def _cli_type(kind):
    """What typer parses: choices as text (pydantic names a wrong one in one line), lists and mappings as
    repeatable text (KEY=VALUE for a mapping)."""
    if get_origin(kind) is Literal:
        return str
    if get_origin(kind) in (list, dict):
        return list[str] if get_origin(kind) is dict else list[_cli_type(get_args(kind)[0])]
    return kind


def option_parameter(name: str, kind, info) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, info])


def parsed_value(path: str, value):
    """A mapping option's KEY=VALUE items as a dict; lists of nothing are no option."""
    if get_origin(bare_type(_field_info(path).annotation)) is dict:
        pairs = {}
        for item in value:
            key, sep, column = item.partition("=")
            if not sep or not key or not column:
                flag = OPTION_NAMES.get(path, path.rsplit(".", 1)[1])
                raise UserError(f"--{flag} expects {PAIRS.get(path, 'KEY=VALUE')}, got {item!r}")
            pairs[key] = column
        return pairs
    return value


def _field_info(path: str):
    section, _, field = path.rpartition(".")
    return _section_model(section).model_fields[field]
