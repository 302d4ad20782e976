"""A domain teacher: a pretrained model fine-tuned on its domain's reference answers before it becomes the teacher.

The paper's GSM8K, Spider and code CLLMs start from domain models, a base LLM fine-tuned on the domain's train set
first. A general chat model answers a domain's prompts in varied prose, and no consistency training teaches a
small model to guess several tokens of prose ahead (SmolLM2-135M-Instruct on GSM8K: 1.1-1.2 tokens per forward after
three epochs, docs/real-model.md); a model trained on the domain's answers answers in their form, which is regular,
and its accuracy is a measure a worse CLLM would lower. The answers are the ingested train split's (`answer`), read
and rendered as the pipeline's prompts are, with the loss on each answer and the end-of-turn token after it; the
loop is the demo teacher's (`teacher_model.train`). Held-out accuracy is measured before and after, so that the
record says what the fine-tuning bought.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from cllm_core.data.answers import CHECKS
from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import SftConfig
from cllm_core.runtime.files import publish_dir
from cllm_core.runtime.guards import BelowQualityFloor, budget_warning
from cllm_core.runtime.identity import digest
from cllm_core.runtime.models import load_model, load_tokenizer, model_identity
from cllm_core.runtime.precision import resolve
from cllm_core.training.teacher import greedy_accuracy, save_teacher
from cllm_core.training.teacher_model import IGNORE, Example, Schedule, train


def build_sft_teacher(config: SftConfig, prompts_dir: str | Path, directory: str | Path, check: str = "math",
                      log: Callable[[str], None] = print, *, precision: str = "auto",
                      warn: Callable[[str], None] | None = None,
                      progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict:
    """Fine-tune `config.model` on the answers of `prompts_dir/train.parquet` into `directory`, or reuse the teacher
    there if it was made from the same config, base model and answers. `check` judges held-out answers
    (`answers.CHECKS`). Returns the record (`teacher.json`) plus `path` and `reused`; a teacher stopped by its guard
    is announced through `warn`, one below `config.min_accuracy` raises `BelowQualityFloor` and is not published."""
    warn = warn or log
    directory, prompts_dir = Path(directory), Path(prompts_dir)
    train_rows, eval_rows = (_rows(prompts_dir / f"{split}.parquet") for split in ("train", "eval"))
    answered = [row for row in train_rows if row["answer"]]
    if not answered:
        raise UserError(f"sft: none of the {len(train_rows)} train prompts in {prompts_dir} has a reference answer; "
                        "map the source's answer column (ingest.fields: {answer: COLUMN})")
    fingerprint = config.fingerprint(model_identity(config.model),
                                     digest([(row["prompt"], row["answer"]) for row in answered]))
    record = _cached(directory, fingerprint, log)
    if record is not None:
        _check_floor(config, record["metrics"], record.get("precision", "?"))
        return record | {"path": str(directory), "reused": True}
    resolved = resolve(precision, config.model.device)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model)  # fp32 weights: training autocasts to the resolved precision
    examples, too_long = encode_answers(tokenizer, answered, config.max_answer_tokens)
    if not examples:
        raise UserError(f"sft: every answer is longer than sft.max_answer_tokens={config.max_answer_tokens}; raise it")
    steps = max(1, math.ceil(config.epochs * len(examples) / config.batch_size))
    judge = CHECKS[check]
    held_out = ([row["prompt"] for row in eval_rows if row["answer"]], [row["answer"] for row in eval_rows
                                                                        if row["answer"]])

    def accuracy() -> float | None:
        if not held_out[0]:
            return None
        return greedy_accuracy(model, tokenizer, *held_out, judge, batch_size=16,
                               max_new_tokens=config.eval_max_new_tokens)

    before = accuracy()
    log(f"fine-tuning {config.model.name_or_path} on {len(examples):,} answers ({too_long} over "
        f"{config.max_answer_tokens} tokens left out) for {steps} steps ({config.epochs:g} epochs) in {resolved.name} "
        f"(guard: {config.max_minutes:g} minutes); held-out accuracy before: {_share(before)}")
    history: list[dict[str, float]] = []

    def on_step(step: int, figures: dict[str, float]) -> None:
        history.append({"step": step, "epoch": (step + 1) * config.batch_size / len(examples), **figures})
        if progress:
            progress(step + 1, steps, figures)
        if step % 25 == 0 or step + 1 == steps:
            left = figures["seconds"] / (step + 1) * (steps - step - 1)
            log(f"step {step + 1}/{steps}: loss {figures['train_loss']:.3f}, {figures['tokens_per_s']:.0f} "
                f"tokens/s, about {left:.0f} s left")

    model.train()
    metrics = train(Schedule.of(config, steps=steps), model, examples, tokenizer.pad_token_id, on_step,
                    resolved.autocast, log_every=5)
    if metrics["stopped_by_budget"]:
        warn(budget_warning("domain teacher fine-tuning", metrics["train_steps"], steps, metrics["train_seconds"],
                            resolved.name, "sft.max_minutes") + "; the next run trains it again")
    after = accuracy()
    metrics |= {"steps": steps, "answers": len(examples), "answers_too_long": too_long,
                "epochs": metrics["train_steps"] * config.batch_size / len(examples),
                "parameters": sum(p.numel() for p in model.parameters()), "eval_problems": len(held_out[0]),
                "eval_accuracy_before": before, "eval_accuracy": after}
    log(f"held-out accuracy on {len(held_out[0])} prompts: {_share(before)} before, {_share(after)} after")
    if before is not None and after is not None and after < before:
        warn(f"sft: the teacher answers {_share(after)} of the held-out prompts right, its base {_share(before)}: "
             "the fine-tuning made it worse (lower sft.lr or sft.epochs)")
    _check_floor(config, metrics, resolved.name)
    with publish_dir(directory) as staging:
        save_teacher(model.eval(), tokenizer, staging, config, metrics, history, resolved.name,
                     fingerprint=fingerprint)
    return json.loads((directory / "teacher.json").read_text()) | {"path": str(directory), "reused": False}


def encode_answers(tokenizer, rows: list[dict], max_answer_tokens: int) -> tuple[list[Example], int]:
    """Rendered prompt + answer + end of turn per row, the loss on the answer and the end of turn; and how many
    answers were over `max_answer_tokens` (left out). A prompt is tokenized as the pipeline encodes it (a chat
    template's rendering carries its own special tokens)."""
    chat = bool(tokenizer.chat_template)
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=not chat)["input_ids"]
    answers = tokenizer([row["answer"] for row in rows], add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id
    kept = [(prompt + answer + [end], [IGNORE] * len(prompt) + answer + [end])
            for prompt, answer in zip(prompts, answers) if len(answer) < max_answer_tokens]
    return kept, len(rows) - len(kept)


def describe_sft(record: dict) -> str:
    """One line on a domain teacher's record: where, trained or reused, what it learned from, accuracy."""
    metrics, base = record["metrics"], record["config"]["model"]["name_or_path"]
    return (f"{record['path']} ({'reused' if record['reused'] else 'trained'}): {base} fine-tuned on "
            f"{metrics['answers']:,} answers, {metrics['train_steps']} steps "
            f"({metrics['epochs']:.2f} epochs) in {metrics['train_seconds']:.0f} s; held-out accuracy "
            f"{_share(metrics['eval_accuracy_before'])} before, {_share(metrics['eval_accuracy'])} after "
            f"({metrics['eval_problems']} prompts)")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"sft: no ingested prompts at {path}; the sft stage ingests them first (cllm teacher)")
    return pq.read_table(path, columns=["prompt", "answer"]).to_pylist()


def _cached(directory: Path, fingerprint: str, log: Callable[[str], None]) -> dict | None:
    """The teacher record in `directory` when it was made from the same inputs and finished its steps."""
    path = directory / "teacher.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != fingerprint:
        log(f"the teacher in {directory} was made from another config, base model or answers; fine-tuning again")
        return None
    if record["metrics"]["stopped_by_budget"]:
        log(f"the teacher in {directory} was stopped by its guard at step {record['metrics']['train_steps']} of "
            f"{record['metrics']['steps']}; fine-tuning it again")
        return None
    log(f"reusing the domain teacher in {directory} (fingerprint {fingerprint})")
    return record


def _check_floor(config: SftConfig, metrics: dict, precision: str) -> None:
    accuracy = metrics["eval_accuracy"]
    if config.min_accuracy is None or (accuracy is not None and accuracy >= config.min_accuracy):
        return
    remedy = ("raise sft.max_minutes (its guard stopped training) or use a faster machine"
              if metrics["stopped_by_budget"] else "raise sft.epochs or sft.max_train, or lower sft.min_accuracy")
    raise BelowQualityFloor(f"the domain teacher reached {_share(accuracy)} accuracy on {metrics['eval_problems']} "
                            f"held-out prompts after {metrics['train_steps']} of {metrics['steps']} steps "
                            f"({precision}), below sft.min_accuracy {config.min_accuracy:.0%}: {remedy}; nothing "
                            "downstream ran")


def _share(value: float | None) -> str:
    return "n/a (no held-out answers)" if value is None else f"{value:.1%}"

