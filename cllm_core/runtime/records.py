"""What the stages hand each other and store: frozen records, each figure named once here.

A collection's `CollectionPlan` (what is done, what to do), a shard's `ShardManifest` (`shard-NNNNN.json`), a
CLLM's `CllmRecord` (`cllm.json` beside the model) and an evaluation's `Evaluation` with one `SummaryRow` per
(model, method). The stored files keep their JSON keys; `from_json` and `to_json` are the only translation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


class Record:
    """A frozen dataclass read from and written to JSON by field name (unknown keys kept in `extra`)."""

    @classmethod
    def from_json(cls, data: dict[str, Any], **more):
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in (data | more).items() if k in names}
        if "extra" in names:
            known["extra"] = {k: v for k, v in data.items() if k not in names}
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return data | data.pop("extra", {})


@dataclass(frozen=True)
class CollectionPlan(Record):
    """A collection pinned to its store: its record (config, teacher, tokenizer, precision, `config_hash`), the
    prompt count, and the shards already done (verified) and to do."""

    collection: dict
    prompts: int
    shards: int
    done: tuple[int, ...]
    todo: tuple[int, ...]

    @property
    def config_hash(self) -> str:
        return self.collection["config_hash"]


@dataclass(frozen=True)
class ShardManifest(Record):
    """`shard-NNNNN.json`: what vouches for a shard file, and how fast it was collected."""

    shard: int
    rows: int
    bytes: int
    sha256: str
    config_hash: str
    teacher: str
    schema_version: int
    seconds: float
    prompts_per_s: float
    tokens_per_s: float
    tokens: int
    forwards: int
    mean_passes_per_block: float
    repetitive: int
    unfinished: int = 0  # prompts left out because the teacher's greedy response did not end in the budget
    departed: int = 0  # prompts left out because their fixed points are not the reference's (collect.reference)
    extra: dict = field(default_factory=dict)

    COLUMNS: ClassVar = ("shard", "rows", "tokens", "seconds", "prompts_per_s", "mean_passes_per_block",
                         "repetitive", "unfinished", "departed")
    """The figures a table of shards shows (Prefect's collect-shards artifact)."""


def collection_figures(manifests: list[ShardManifest]) -> dict[str, float]:
    """Throughput and cleaning figures over collected shards (none: an empty dict)."""
    if not manifests:
        return {}
    rows, seconds = sum(m.rows for m in manifests), sum(m.seconds for m in manifests)
    return {"prompts_per_s": rows / seconds, "tokens_per_s": sum(m.tokens for m in manifests) / seconds,
            "repetitive": sum(m.repetitive for m in manifests), "unfinished": sum(m.unfinished for m in manifests),
            "departed": sum(m.departed for m in manifests),
            "mean_passes_per_block": sum(m.mean_passes_per_block * m.rows for m in manifests) / max(rows, 1)}


@dataclass(frozen=True)
class CllmRecord(Record):
    """`cllm.json`: how a CLLM was made (config, fingerprint, precision, teacher, trajectories and how they were
    decoded, block size), what training measured (`metrics`, `history`); plus where it is, whether this run
    reused it, and once logged to MLflow, where (`logged`: model_uri, registered_model, version)."""

    config: dict
    fingerprint: str
    precision: str
    teacher: dict
    trajectories: dict
    n_tokens: int
    metrics: dict
    history: list
    path: str = ""
    reused: bool = False
    logged: dict = field(default_factory=dict)

    STORED: ClassVar = ("config", "fingerprint", "precision", "teacher", "trajectories", "n_tokens", "metrics",
                        "history")
    """The fields `cllm.json` holds (where it is and how this run got it are not stored)."""

    def stored(self) -> dict:
        return {key: getattr(self, key) for key in self.STORED}


@dataclass(frozen=True)
class SummaryRow(Record):
    """One (model, method) of an evaluation, totals over its prompts."""

    model: str
    method: str
    prompts: int
    new_tokens: int
    forwards: int
    tokens_per_forward: float  # total new tokens / total forwards
    tokens_per_s: float  # total new tokens / total seconds
    seconds: float
    accuracy: float  # share of prompts whose answer is right
    exact_match: float  # share of outputs equal to the same model's AR output
    repetition_rate: float  # share of outputs flagged as degenerate repetition
    fast_forward: int
    stationary: int
    speedup: float | None = None  # tokens/s over the baseline pair's (None: no baseline was measured)
    mean_speedup: float | None = None  # the mean of per-prompt tokens/s ratios
    answer_agreement: float | None = None  # share of prompts whose final answer is the baseline pair's
    same_as_baseline: float | None = None  # share of outputs identical to the baseline pair's
    baseline_logprob: float | None = None  # the baseline model's mean per-token log-likelihood of these outputs

    HEADLINE: ClassVar = ("tokens_per_forward", "tokens_per_s", "speedup", "mean_speedup", "accuracy", "exact_match",
                          "repetition_rate", "answer_agreement", "same_as_baseline", "baseline_logprob")
    """The figures logged as MLflow metrics, named `{model}.{method}.{figure}`."""


def headline_metrics(summary: list[SummaryRow]) -> dict[str, float]:
    """The summary as flat metrics with stable names: `{model}.{method}.{figure}` (figures not measured left out)."""
    return {f"{row.model}.{row.method}.{key}": float(getattr(row, key)) for row in summary
            for key in SummaryRow.HEADLINE if getattr(row, key) is not None}


@dataclass(frozen=True)
class Evaluation(Record):
    """What an evaluation wrote and measured: the summary rows, the per-sample Parquet, the pictures, and how it
    decoded (baseline pair, answer check, precision, Jacobi settings with the block size used)."""

    summary: list[SummaryRow]
    samples: str
    pictures: list[str]
    prompts: int
    baseline: tuple[str, str]
    check: str
    precision: str
    jacobi: dict
