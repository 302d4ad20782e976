"""The profile: one pydantic section per stage, every field described once (CLI help, the Prefect UI and the
documentation's configuration reference read it), and its parsing from YAML and `--set`.

`sections` holds the shared sections and those of the first stages, `finetune` the fine-tuning's, `profile` the
evaluation's, tracking's and the whole profile, `parsing` the reading, `catalogue` the dataset presets
and prompt templates a profile may name. Every name is importable from here.
"""

from cllm_core.runtime.config.finetune import FinetuneConfig, LaunchSection, LoraSection
from cllm_core.runtime.config.parsing import describe, load_profile, masked, put, read_profile, set_value
from cllm_core.runtime.config.profile import (
    EvalConfig,
    MultiBlockConfig,
    Profile,
    PromoteConfig,
    SecondRound,
    TrackingConfig,
)
from cllm_core.runtime.config.sections import (
    DEFAULT_BLOCK,
    JACOBI_FIELDS,
    SMOLLM2,
    CollectConfig,
    IngestConfig,
    Init,
    JacobiConfig,
    ModelConfig,
    Precision,
    Section,
    SftConfig,
    TeacherConfig,
    chosen_block_size,
    trained_block_size,
)

__all__ = ["DEFAULT_BLOCK", "JACOBI_FIELDS", "SMOLLM2", "CollectConfig", "EvalConfig", "FinetuneConfig", "IngestConfig",
           "Init", "JacobiConfig", "LaunchSection", "LoraSection", "ModelConfig", "MultiBlockConfig", "Precision",
           "Profile", "PromoteConfig", "SecondRound", "Section", "SftConfig", "TeacherConfig", "TrackingConfig",
           "chosen_block_size", "describe", "load_profile", "masked", "put", "read_profile", "set_value",
           "trained_block_size"]
