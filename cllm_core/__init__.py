"""cllm_core: the Consistency-LLM library. Pure: importable without Prefect or MLflow.

Its packages, each with one job, from the bottom layer up: `engine` (the Jacobi loop and everything a decode needs;
shipped inside every CLLM), `runtime` (the profile's schema and parsing, models, precision, identities, files,
records, guards), `data` (prompts, trajectories), `training` (fine-tuning, its launch, the demo teacher) and
`evaluation` (docs/architecture.md draws them).

The names below load on first use, so `cllm --help` and the config modules do not pay for torch and transformers.
"""

from importlib import import_module

_HOMES = {
    "ar_generate": "engine.baselines", "lookup_generate": "engine.baselines",
    "reference_jacobi_generate": "engine.baselines",
    "SMOLLM2": "runtime.config", "ModelConfig": "runtime.config",
    "JacobiStep": "engine.jacobi", "RowStep": "engine.rows", "jacobi_generate": "engine.jacobi",
    "greedy_generate": "engine.jacobi",
    "jacobi_steps": "engine.jacobi",
    "load_model": "runtime.models", "load_tokenizer": "runtime.models",
    "BlockTrajectory": "engine.outputs", "DecodeOutput": "engine.outputs", "DecodeStats": "engine.outputs",
    "UserError": "engine.errors",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'cllm_core' has no attribute {name!r}")
    return getattr(import_module(f"cllm_core.{_HOMES[name]}"), name)
