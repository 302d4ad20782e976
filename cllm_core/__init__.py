"""cllm_core: the Consistency-LLM library. Pure: importable without Prefect or MLflow."""

from cllm_core.baselines import ar_generate, lookup_generate, reference_jacobi_generate
from cllm_core.config import SMOLLM2, ModelConfig
from cllm_core.jacobi import JacobiStep, RowStep, jacobi_generate, jacobi_steps
from cllm_core.models import load_model, load_tokenizer
from cllm_core.outputs import BlockTrajectory, DecodeOutput, DecodeStats

__all__ = [
    "SMOLLM2",
    "BlockTrajectory",
    "DecodeOutput",
    "DecodeStats",
    "JacobiStep",
    "ModelConfig",
    "RowStep",
    "ar_generate",
    "jacobi_generate",
    "jacobi_steps",
    "load_model",
    "load_tokenizer",
    "lookup_generate",
    "reference_jacobi_generate",
]
