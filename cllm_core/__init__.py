"""cllm_core: the Consistency-LLM library. Pure: importable without Prefect or MLflow.

The names below load on first use, so `cllm --help` and the config modules do not pay for torch and transformers.
"""

from importlib import import_module

_HOMES = {
    "ar_generate": "baselines", "lookup_generate": "baselines", "reference_jacobi_generate": "baselines",
    "SMOLLM2": "config", "ModelConfig": "config",
    "JacobiStep": "jacobi", "RowStep": "jacobi", "jacobi_generate": "jacobi", "jacobi_steps": "jacobi",
    "load_model": "models", "load_tokenizer": "models",
    "BlockTrajectory": "outputs", "DecodeOutput": "outputs", "DecodeStats": "outputs",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'cllm_core' has no attribute {name!r}")
    return getattr(import_module(f"cllm_core.{_HOMES[name]}"), name)
