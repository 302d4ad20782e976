"""A profile read from YAML and changed by `--set`; a bad profile is one UserError naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config.profile import Profile


def read_profile(path: str | Path) -> dict:
    """A YAML profile's raw sections, after checking that they validate (one UserError naming the field)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"profile {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        Profile.model_validate(data)
    except yaml.YAMLError as error:
        raise UserError(f"profile {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    except ValidationError as error:
        raise UserError(f"profile {path}: {describe(error)}") from None
    return data


def set_value(data: dict, item: str) -> None:
    """Apply one `SECTION.FIELD=VALUE` override to a raw profile (the value read as YAML: 32, true, [a, b])."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects SECTION.FIELD=VALUE (e.g. collect.n_tokens=32), got {item!r}")
    put(data, key, yaml.safe_load(value))


def put(data: dict, key: str, value) -> None:
    """Set the value at a dotted key (`collect.n_tokens`) of a raw profile, making the sections it needs."""
    *path, last = key.split(".")
    node = data
    for part in path:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"{key}: {part} is not a section")
    node[last] = value


def load_profile(path: str | Path) -> Profile:
    """Read a YAML profile; any problem is one UserError naming the file and the field."""
    return Profile.model_validate(read_profile(path))


def describe(error: ValidationError) -> str:
    """A pydantic error as one line that names the field: 'decode.n_tokens: Input should be ...'."""
    first = error.errors()[0]
    got = masked(repr(first.get("input")))
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']} (got {got})"


def masked(text: str) -> str:
    """The text with the credentials of any URI in it (scheme://user:password@) replaced by ***."""
    return re.sub(r"(\b[a-z][\w+.-]*://)[^/@\s'\"]+@", r"\1***@", text, flags=re.IGNORECASE)
