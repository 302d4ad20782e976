"""A domain teacher: a pretrained model fine-tuned on its domain's reference answers before it becomes the teacher.

The paper's GSM8K, Spider and code CLLMs start from domain models, a base LLM fine-tuned on the domain's train set
first. A general chat model answers a domain's prompts in varied prose, and no consistency training teaches a
small model to guess several tokens of prose ahead (SmolLM2-135M-Instruct on GSM8K: 1.1-1.2 tokens per forward after
three epochs, docs/real-model.md); a model trained on the domain's answers answers in their form, which is regular,
and its accuracy is a measure a worse CLLM would lower. The answers are the ingested train split's (`answer`), read
and encoded as the pipeline's prompts are, with the loss on each answer and the token the model stops at after it;
the loop is the demo teacher's (`teacher_model.train`). Held-out accuracy is measured before and after, so that the
record says what the fine-tuning bought.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from cllm_core.data.answers import CHECKS
from cllm_core.data.collect import rendered_with_chat
from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import SftConfig
from cllm_core.runtime.files import publish_dir
from cllm_core.runtime.guards import BelowQualityFloor, budget_warning
from cllm_core.runtime.identity import digest
from cllm_core.runtime.models import load_model, load_tokenizer, model_identity
from cllm_core.runtime.precision import resolve
from cllm_core.training.teacher import greedy_accuracy, save_teacher
from cllm_core.training.teacher_model import IGNORE, Example, Schedule, train

Progress = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class Answers:
    """The ingested prompts a domain teacher learns from and is measured on."""

    train: list[dict]  # {prompt, answer} of the train prompts that have an answer
    held_out: list[dict]  # the same of the held-out prompts
    chat: bool  # rendered with the chat template (which writes its own special tokens)

    @classmethod
    def read(cls, prompts_dir: Path) -> Answers:
        tables = {}
        for split in ("train", "eval"):
            path = prompts_dir / f"{split}.parquet"
            if not path.is_file():
                raise UserError(f"sft: no ingested prompts at {path}; `cllm teacher` ingests them first")
            tables[split] = pq.read_table(path, columns=["prompt", "answer"])
        chat = rendered_with_chat(pq.read_schema(prompts_dir / "train.parquet"))
        answered = {split: [row for row in table.to_pylist() if row["answer"]] for split, table in tables.items()}
        if not answered["train"]:
            raise UserError(f"sft: none of the {tables['train'].num_rows} train prompts in {prompts_dir} has a "
                            "reference answer; map the source's answer column (ingest.fields: {answer: COLUMN})")
        return cls(answered["train"], answered["eval"], chat)

    def digest(self, split: str) -> str:
        return digest([(row["prompt"], row["answer"]) for row in getattr(self, split)])


def build_sft_teacher(config: SftConfig, prompts_dir: str | Path, directory: str | Path, check: str = "math",
                      log: Callable[[str], None] = print, *, precision: str = "auto",
                      warn: Callable[[str], None] | None = None, progress: Progress | None = None) -> dict:
    """Fine-tune `config.model` on the answers of `prompts_dir/train.parquet` into `directory`, or reuse the teacher
    there if it was made from the same config, base model, answers and precision. `check` judges held-out answers
    (`answers.CHECKS`). Returns the record (`teacher.json`) plus `path` and `reused`; a teacher stopped by its guard
    is announced through `warn`, one below `config.min_accuracy` raises `BelowQualityFloor` and is not published."""
    warn = warn or log
    directory = Path(directory)
    data = Answers.read(Path(prompts_dir))
    if config.min_accuracy is not None and not data.held_out:
        raise UserError(f"sft.min_accuracy is set but none of the held-out prompts in {prompts_dir} has an answer to "
                        "measure it on: map the source's answer column, or drop sft.min_accuracy")
    resolved = resolve(precision, config.model.device)
    fingerprint = config.fingerprint(model_identity(config.model), data.digest("train"), resolved.name)
    measured = {"check": check, "max_new_tokens": config.eval_max_new_tokens, "prompts": data.digest("held_out")}
    record = _cached(directory, fingerprint, measured, log, warn)
    if record is not None:
        _check_floor(config, record["metrics"], record.get("precision", "?"))
        return record | {"path": str(directory), "reused": True}
    tokenizer, model = load_tokenizer(config.model), load_model(config.model)  # fp32 weights: training autocasts
    generation = model.generation_config
    generation.do_sample = False  # the teacher's outputs are its greedy ones
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    examples, too_long = encode_answers(tokenizer, data.train, data.chat, config.max_answer_tokens,
                                        stop_token(tokenizer, generation.eos_token_id))
    if not examples:
        raise UserError(f"sft: no answer ends within sft.max_answer_tokens={config.max_answer_tokens}; raise it")
    steps = max(1, math.ceil(config.epochs * len(examples) / config.batch_size))

    def accuracy() -> float | None:
        return greedy_accuracy(model, tokenizer, [r["prompt"] for r in data.held_out],
                               [r["answer"] for r in data.held_out], CHECKS[check], batch_size=16,
                               max_new_tokens=config.eval_max_new_tokens, chat=data.chat) if data.held_out else None

    before = accuracy()
    log(f"fine-tuning {config.model.name_or_path} on {len(examples):,} answers ({too_long} not ending within "
        f"{config.max_answer_tokens} tokens left out) for {steps} steps ({config.epochs:g} epochs) in {resolved.name} "
        f"(guard: {config.max_minutes:g} minutes); held-out accuracy before: {_share(before)}")
    metrics, history = _fit(config, model, examples, tokenizer.pad_token_id, steps, resolved, log, progress)
    if metrics["stopped_by_budget"]:
        warn(budget_warning("domain teacher fine-tuning", metrics["train_steps"], steps, metrics["train_seconds"],
                            resolved.name, "sft.max_minutes") + "; the next run trains it again")
    after = accuracy()
    metrics |= {"steps": steps, "answers": len(examples), "answers_too_long": too_long,
                "epochs": metrics["train_steps"] * config.batch_size / len(examples),
                "parameters": sum(p.numel() for p in model.parameters()), "eval_problems": len(data.held_out),
                "eval_accuracy_before": before, "eval_accuracy": after}
    log(f"held-out accuracy on {len(data.held_out)} prompts: {_share(before)} before, {_share(after)} after")
    if before is not None and after is not None and after < before:
        warn(f"sft: the teacher answers {_share(after)} of the held-out prompts right, its base {_share(before)}: "
             "the fine-tuning made it worse (lower sft.lr or sft.epochs)")
    _check_floor(config, metrics, resolved.name)
    with publish_dir(directory) as staging:
        save_teacher(model.eval(), tokenizer, staging, config, metrics, history, resolved.name, generation,
                     fingerprint=fingerprint, measured=measured)
    return json.loads((directory / "teacher.json").read_text()) | {"path": str(directory), "reused": False}


def stop_token(tokenizer, eos_token_id: int | list[int] | None) -> int:
    """The token an answer ends with: the tokenizer's end of sequence where generation stops at it, else the first
    token it stops at (generation config order), so that the teacher learns an ending its decoding honours."""
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return tokenizer.eos_token_id if not stops or tokenizer.eos_token_id in stops else stops[0]


def encode_answers(tokenizer, rows: list[dict], chat: bool, max_answer_tokens: int,
                   end: int) -> tuple[list[Example], int]:
    """Rendered prompt + answer + `end` per row, the loss on the answer and `end`; and how many answers did not end
    within `max_answer_tokens` (`end` counted), left out. Prompts are tokenized as the pipeline encodes them: a chat
    template's rendering carries its own special tokens, a plain one gets the tokenizer's (`prompts.encode`)."""
    prompts = tokenizer([row["prompt"] for row in rows], add_special_tokens=not chat)["input_ids"]
    answers = tokenizer([row["answer"] for row in rows], add_special_tokens=False)["input_ids"]
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


def _fit(config: SftConfig, model, examples: list[Example], pad: int, steps: int, resolved,
         log: Callable[[str], None], progress: Progress | None) -> tuple[dict, list[dict]]:
    """The demo teacher's loop over the answers for `steps`; its metrics and the loss curve by step and epoch."""
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
    metrics = train(Schedule.of(config, steps=steps), model, examples, pad, on_step, resolved.autocast, log_every=5)
    return metrics, history


def _cached(directory: Path, fingerprint: str, measured: dict, log: Callable[[str], None],
            warn: Callable[[str], None]) -> dict | None:
    """The teacher record in `directory` when it was made from the same inputs and finished its steps."""
    path = directory / "teacher.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != fingerprint:
        log(f"the teacher in {directory} was made from another config, base model, answers or precision; "
            "fine-tuning again")
        return None
    if record["metrics"]["stopped_by_budget"]:
        log(f"the teacher in {directory} was stopped by its guard at step {record['metrics']['train_steps']} of "
            f"{record['metrics']['steps']}; fine-tuning it again")
        return None
    log(f"reusing the domain teacher in {directory} (fingerprint {fingerprint})")
    if record.get("measured") != measured:
        warn(f"the domain teacher's recorded held-out accuracy ({_share(record['metrics']['eval_accuracy'])}) was "
             f"measured with another check, budget or held-out set than now ({measured['check']}, "
             f"{measured['max_new_tokens']} tokens); its floor is judged on that figure")
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
