"""The offline demo teacher: a byte-level BPE tokenizer and a small Llama trained from scratch on synthetic math.

No hub is reachable on a fresh machine, so the demo trains its own teacher and saves it as an ordinary Hugging
Face model directory; every later stage loads it like any hub model. What makes it competent in minutes on two
CPU cores (measured; notes in the README): arithmetic the model can learn (data/synthetic_math.py), every digit
a token of its own, the loss on answers only, arithmetic drills mixed into the batches, and Muon on the hidden
matrices, which brought held-out accuracy from 36% (AdamW) to 100% in the same 1,200 steps. The schedule is the
step count's, so every machine trains the same teacher; the wall-clock budget is a guard, and loud when it acts.
Training runs in the run's precision (`cllm_core.runtime.precision`), Muon's iteration included.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cllm_core.config import TeacherConfig
from cllm_core.data.answers import is_correct
from cllm_core.data.templates import render_template
from cllm_core.engine.baselines import ar_generate
from cllm_core.engine.stopping import raise_if_stopped
from cllm_core.runtime.files import publish_dir
from cllm_core.runtime.guards import BelowQualityFloor, budget_warning
from cllm_core.runtime.precision import resolve
from cllm_core.training.muon import Muon
from cllm_core.training.schedule import warmup_cosine

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IGNORE = -100  # label of a position without loss
Problem = dict[str, str]
Example = tuple[list[int], list[int]]  # (input ids, labels)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE where every digit is its own token and nothing else splits the text.

    Digits stand alone (no leading space), so a number is the same tokens wherever it appears and place
    value is position; BPE merges freely across words elsewhere, so recurring phrases of the domain become
    single tokens and sequences are about half as long as with word-level pre-tokenization.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", model_max_length=512)


def build_model(config: TeacherConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A Llama of the configured shape with tied embeddings, seeded."""
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def encode_examples(tokenizer, problems: list[Problem], template: str) -> list[Example]:
    """Prompt (with BOS) + answer + EOS per problem; the loss covers the answer and EOS only."""
    prompts = tokenizer([render_template(template, p) for p in problems])["input_ids"]
    answers = tokenizer([p["answer"] for p in problems], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(prompt + answer + [eos], [IGNORE] * len(prompt) + answer + [eos])
            for prompt, answer in zip(prompts, answers)]


def encode_drills(tokenizer, problems: list[Problem], count: int, lines: int, seed: int) -> list[Example]:
    """Arithmetic drills: `count` sequences of `lines` worked lines drawn from the problems (`a op b = c`).

    The loss covers the results only, so every drill token of signal is arithmetic; word problems teach
    which numbers to combine, drills make the combining itself cheap to learn.
    """
    worked = [line for p in problems for line in p["answer"].split("\n")[:-1]]
    rng = random.Random(seed)
    drawn = [rng.choice(worked) for _ in range(count * lines)]
    left = tokenizer([line.split("= ")[0] + "= " for line in drawn], add_special_tokens=False)["input_ids"]
    right = tokenizer([line.split("= ")[1] + "\n" for line in drawn], add_special_tokens=False)["input_ids"]
    drills = []
    for start in range(0, len(drawn), lines):
        ids, labels = [tokenizer.bos_token_id], [IGNORE]
        for question, result in zip(left[start:start + lines], right[start:start + lines]):
            ids += question + result
            labels += [IGNORE] * len(question) + result
        drills.append((ids, labels))
    return drills


def batches(examples: list[Example], batch_size: int, pad: int, rng: random.Random):
    """Endless length-bucketed batches (input_ids, labels), padded on the right to a multiple of 16.

    Few distinct shapes matter on CPU: the first step of each new shape pays kernel set-up.
    """
    while True:
        order = rng.sample(range(len(examples)), len(examples))
        chunk = batch_size * 64
        groups = []
        for start in range(0, len(order), chunk):
            ranked = sorted(order[start:start + chunk], key=lambda i: len(examples[i][0]))
            groups += [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            width = -(-max(len(examples[i][0]) for i in group) // 16) * 16
            ids = torch.full((len(group), width), pad)
            labels = torch.full((len(group), width), IGNORE)
            for row, i in enumerate(group):
                tokens, targets = examples[i]
                ids[row, :len(tokens)] = torch.tensor(tokens)
                labels[row, :len(targets)] = torch.tensor(targets)
            yield ids, labels


def learning_rate(config: TeacherConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak as progress (of the whole run) goes from 0 to 1."""
    return config.lr * warmup_cosine(step, config.warmup_steps, progress, floor=0.1)


def make_optimisers(config: TeacherConfig, model: LlamaForCausalLM,
                    dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
    """AdamW everywhere, or Muon on the hidden matrices (AdamW keeps embeddings and norms), as configured;
    Muon's Newton-Schulz iteration runs in `dtype`."""
    hidden = [p for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name]
    other = [p for name, p in model.named_parameters() if p.dim() != 2 or "embed" in name]
    adamw = lambda groups: torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))  # noqa: E731
    if config.optimizer == "adamw":
        matrices = [p for p in other if p.dim() == 2]
        vectors = [p for p in other if p.dim() != 2]
        return [adamw([{"params": hidden + matrices, "weight_decay": config.weight_decay, "lr_scale": 1.0},
                       {"params": vectors, "weight_decay": 0.0, "lr_scale": 1.0}])]
    muon = Muon(hidden, lr=config.lr, weight_decay=config.weight_decay, dtype=dtype)
    for group in muon.param_groups:
        group["lr_scale"] = config.muon_lr_scale
    return [muon, adamw([{"params": other, "weight_decay": 0.0, "lr_scale": 1.0}])]


def train(config: TeacherConfig, model: LlamaForCausalLM, examples, pad: int,
          log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
          autocast: torch.dtype | None = None, log_every: int = 25) -> dict[str, float]:
    """Train in place (fp32 weights, `autocast` compute if given) for `steps`, unless the `max_minutes` guard
    stops it first; `log` gets (step, figures) every `log_every` steps. Returns the run's summary figures."""
    optimisers = make_optimisers(config, model, autocast or torch.float32)
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    model.train()
    start, ema, tokens, done = time.perf_counter(), None, 0, 0
    stream = batches(examples, config.batch_size, pad, random.Random(config.seed))
    for step in range(config.steps):
        raise_if_stopped()
        for optimiser in optimisers:
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(config, step, step / config.steps) * group["lr_scale"]
        ids, labels = (t.to(device) for t in next(stream))
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
        scaler.scale(loss).backward()
        for optimiser in optimisers:
            scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for optimiser in optimisers:
            scaler.step(optimiser)
            optimiser.zero_grad(set_to_none=True)
        scaler.update()
        tokens, done = tokens + int((ids != pad).sum()), done + 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % log_every == 0 or done == config.steps:
            seconds = time.perf_counter() - start
            log(step, {"train_loss": ema, "lr": learning_rate(config, step, step / config.steps),
                       "tokens_per_s": tokens / seconds, "seconds": seconds})
        if time.perf_counter() - start > config.max_minutes * 60:  # a guard: the schedule is the step count's
            break
    model.eval()
    seconds = time.perf_counter() - start
    return {"train_steps": done, "train_seconds": seconds, "train_loss": ema, "train_tokens_per_s": tokens / seconds,
            "stopped_by_budget": float(done < config.steps)}


@torch.inference_mode()
def answer_accuracy(model, tokenizer, problems: list[Problem], template: str, batch_size: int = 50,
                    max_new_tokens: int = 96) -> float:
    """Share of problems whose greedy answer ends with the right `#### N`."""
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        batch = tokenizer([render_template(template, p) for p in chunk], return_tensors="pt", padding=True)
        output = ar_generate(model, batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device),
                             max_new_tokens=max_new_tokens)
        texts = tokenizer.batch_decode(output.sequences, skip_special_tokens=True)
        correct += sum(is_correct(text, p["answer"]) for text, p in zip(texts, chunk))
    return correct / len(problems)


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
    metrics = train(config, model, examples, tokenizer.pad_token_id, on_step, resolved.autocast)
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


def save_teacher(model, tokenizer, directory: Path, config: TeacherConfig, metrics: dict[str, float],
                 history: list[dict[str, float]], precision: str = "fp32") -> None:
    """An ordinary HF model directory plus `teacher.json` (config, the files' content identity, measured figures,
    loss history); the identity's file hashes stay in the directory's sidecar, so no later stage hashes again."""
    from cllm_core.config import ModelConfig
    from cllm_core.runtime.models import model_identity

    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, do_sample=False,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    identity = model_identity(ModelConfig(name_or_path=str(directory)))
    record = {"config": config.model_dump(), "fingerprint": config.fingerprint(), "identity": identity,
              "precision": precision,
              "metrics": metrics,
              "history": history}
    (directory / "teacher.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
