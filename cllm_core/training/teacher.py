"""The offline demo teacher: a byte-level BPE tokenizer and a small Llama trained from scratch on synthetic math.

No hub is reachable on a fresh machine, so the demo trains its own teacher and saves it as an ordinary Hugging
Face model directory; every later stage loads it like any hub model. What makes it competent in minutes on two
CPU cores (measured; docs/stages/teacher.md): arithmetic the model can learn (data/synthetic_math.py), every digit
a token of its own, the loss on answers only, arithmetic drills mixed into the batches, and Muon on the hidden
matrices, which brought held-out accuracy from 36% (AdamW) to 100% in the same 1,200 steps. The schedule is the
step count's, so every machine trains the same teacher; the wall-clock budget is a guard, and loud when it acts.
Training runs in the run's precision (`cllm_core.runtime.precision`), Muon's iteration included.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig

from cllm_core.data.answers import is_correct
from cllm_core.data.prompts import encode
from cllm_core.data.templates import render_template
from cllm_core.engine.baselines import ar_generate
from cllm_core.runtime.config import SftConfig, TeacherConfig
from cllm_core.runtime.files import publish_dir
from cllm_core.runtime.guards import BelowQualityFloor, budget_warning
from cllm_core.runtime.precision import resolve
from cllm_core.training.teacher_model import (
    Problem,
    Schedule,
    build_model,
    encode_drills,
    encode_examples,
    train,
    train_tokenizer,
)


def answer_accuracy(model, tokenizer, problems: list[Problem], template: str, batch_size: int = 50,
                    max_new_tokens: int = 96) -> float:
    """Share of problems whose greedy answer ends with the right `#### N`."""
    prompts = [render_template(template, p) for p in problems]
    return greedy_accuracy(model, tokenizer, prompts, [p["answer"] for p in problems], is_correct, batch_size,
                           max_new_tokens)


@torch.inference_mode()
def greedy_accuracy(model, tokenizer, prompts: list[str], answers: list[str], check: Callable[[str, str], bool],
                    batch_size: int = 50, max_new_tokens: int = 96, chat: bool = False) -> float:
    """Share of rendered prompts whose greedy response `check` finds right against its answer (batched AR);
    `chat`: the prompts were rendered with the chat template (which writes its own special tokens)."""
    correct = 0
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode(tokenizer, prompts[start:start + batch_size], model.device, chat=chat)
        output = ar_generate(model, ids, mask, max_new_tokens=max_new_tokens)
        texts = tokenizer.batch_decode(output.sequences[:, ids.shape[1]:], skip_special_tokens=True)
        correct += sum(check(text, answer) for text, answer in zip(texts, answers[start:start + batch_size]))
    return correct / len(prompts)


def build_teacher(config: TeacherConfig, directory: str | Path, log: Callable[[str], None] = print, *,
                  precision: str = "fp32", warn: Callable[[str], None] | None = None,
                  progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict:
    """Train the demo teacher into `directory`, or reuse the one there if it was built from the same config.

    Returns its record (`teacher.json`: config, fingerprint, precision, metrics, loss history) plus `reused`.
    A teacher stopped by its wall-clock guard is announced through `warn`; one below `config.min_accuracy`
    raises `BelowQualityFloor` and is not published. `progress` gets (step, steps, figures) as it trains.
    """
    from data.synthetic_math import splits

    warn = warn or log
    directory = Path(directory)
    record_path = directory / "teacher.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == config.fingerprint() and record["metrics"]["stopped_by_budget"]:
            log(f"the teacher in {directory} was stopped by its guard at step {record['metrics']['train_steps']} "
                f"of {config.steps}; training it again")
        elif record.get("fingerprint") == config.fingerprint():
            log(f"reusing the demo teacher in {directory} (config {config.fingerprint()})")
            check_floor(config, record["metrics"], record.get("precision", "?"))
            return record | {"path": str(directory), "reused": True}
        else:
            log(f"the teacher in {directory} was built from another config; training a new one")
    resolved = resolve(precision, "cpu")
    train_set, eval_set = splits(config.train_problems, config.eval_problems)
    texts = [render_template(config.template, p) + p["answer"] for p in train_set]
    tokenizer = train_tokenizer(texts, config.vocab_size)
    model = build_model(config, tokenizer)
    history: list[dict[str, float]] = []

    def on_step(step: int, figures: dict[str, float]) -> None:
        history.append({"step": step, **figures})
        if progress:
            progress(step + 1, config.steps, figures)
        if step % 100 == 0 or step + 1 == config.steps:  # the same figures where no terminal shows the bar
            left = figures["seconds"] / (step + 1) * (config.steps - step - 1)
            log(f"step {step + 1}/{config.steps}: loss {figures['train_loss']:.3f}, "
                f"{figures['tokens_per_s']:.0f} tokens/s, about {left:.0f} s left")

    log(f"training a {sum(p.numel() for p in model.parameters()):,}-parameter teacher on {len(train_set):,} "
        f"problems for {config.steps} steps in {resolved.name} (guard: {config.max_minutes:g} minutes)")
    examples = encode_examples(tokenizer, train_set, config.template)
    drills = round(len(examples) * config.drill_share / (1 - config.drill_share))
    examples += encode_drills(tokenizer, train_set, drills, config.drill_lines, config.seed)
    metrics = train(Schedule.of(config), model, examples, tokenizer.pad_token_id, on_step, resolved.autocast)
    if metrics["stopped_by_budget"]:
        warn(budget_warning("teacher", metrics["train_steps"], config.steps, metrics["train_seconds"],
                            resolved.name, "teacher.max_minutes"))
    metrics |= {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
                "eval_problems": len(eval_set),
                "eval_accuracy": answer_accuracy(model, tokenizer, eval_set, config.template)}
    log(f"exact-answer accuracy on {len(eval_set)} held-out problems: {metrics['eval_accuracy']:.1%}")
    check_floor(config, metrics, resolved.name)
    with publish_dir(directory) as staging:
        save_teacher(model, tokenizer, staging, config, metrics, history, resolved.name)
    return json.loads(record_path.read_text()) | {"path": str(directory), "reused": False}


def check_floor(config: TeacherConfig, metrics: dict, precision: str) -> None:
    """Raise `BelowQualityFloor` when the teacher's held-out accuracy is under `config.min_accuracy`."""
    if config.min_accuracy is None or metrics["eval_accuracy"] >= config.min_accuracy:
        return
    budget = metrics["stopped_by_budget"]
    remedy = ("raise teacher.max_minutes (its guard stopped training) or use a faster machine" if budget
              else "raise teacher.steps, or lower teacher.min_accuracy if this is enough for you")
    raise BelowQualityFloor(
        f"the demo teacher reached {metrics['eval_accuracy']:.1%} exact-answer accuracy on "
        f"{metrics['eval_problems']} held-out problems after {metrics['train_steps']} of {config.steps} steps "
        f"({precision}), below teacher.min_accuracy {config.min_accuracy:.0%}: {remedy}; nothing downstream ran")


def describe_teacher(record: dict) -> str:
    """One line on a teacher record: where, trained or reused, size, training and held-out accuracy."""
    metrics = record["metrics"]
    return (f"{record['path']} ({'reused' if record['reused'] else 'trained'}): {metrics['parameters']:,} parameters, "
            f"{metrics['train_steps']} steps in {metrics['train_seconds']:.0f} s, exact-answer accuracy "
            f"{metrics['eval_accuracy']:.1%} on {metrics['eval_problems']} held-out problems")


def save_teacher(model, tokenizer, directory: Path, config: TeacherConfig | SftConfig, metrics: dict[str, float],
                 history: list[dict[str, float]], precision: str = "fp32", generation: GenerationConfig | None = None,
                 **fields) -> None:
    """An ordinary HF model directory plus `teacher.json` (config, fingerprint, the files' content identity, measured
    figures, loss history); the identity's file hashes stay in the directory's sidecar, so no later stage hashes
    again. `generation`: the model's generation config (the demo teacher's greedy one, from its tokenizer, if not
    given); `fields` over the record's (a domain teacher's fingerprint, how its accuracy was measured)."""
    from cllm_core.runtime.config import ModelConfig
    from cllm_core.runtime.models import model_identity

    model.generation_config = generation or GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, do_sample=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    identity = model_identity(ModelConfig(name_or_path=str(directory)))
    record = {"config": config.model_dump(), "fingerprint": fields.pop("fingerprint", None) or config.fingerprint(),
              "identity": identity, "precision": precision, "metrics": metrics, "history": history} | fields
    (directory / "teacher.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
