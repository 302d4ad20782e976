"""The demo teacher's making, piece by piece: a byte-level BPE tokenizer with a token per digit, a small Llama,
the examples (the loss on answers only) and arithmetic drills, batches, Muon for the hidden matrices and AdamW for
the rest, and the training loop with its step-count schedule and wall-clock guard. teacher.py builds, checks and
saves the teacher from them; sft.py fine-tunes a pretrained model into a domain teacher with the same loop."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cllm_core.data.templates import render_template
from cllm_core.engine.stopping import raise_if_stopped
from cllm_core.runtime.config import TeacherConfig
from cllm_core.training.muon import Muon
from cllm_core.training.schedule import warmup_cosine

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # the tokenizer's special tokens


IGNORE = -100  # label of a position without loss


Problem = dict[str, str]


Example = tuple[list[int], list[int]]  # (input ids, labels)


@dataclass(frozen=True)
class Schedule:
    """What `train` runs: its length in steps, batches, optimiser and wall-clock guard. The demo teacher's is its
    `TeacherConfig`'s; a domain teacher's (`SftConfig`) counts its steps from its epochs."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    max_minutes: float
    seed: int
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr_scale: float = 1.0

    @classmethod
    def of(cls, config, **given) -> Schedule:
        """The schedule a config section holds (the fields of the same names), `given` over it."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)} | given)


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
    """Endless length-bucketed batches (input_ids, labels, attention_mask), padded on the right to a multiple of 16.
    The mask is the examples' lengths', not `ids != pad`: a chat model's pad is often its end-of-turn token, which
    its prompts hold too.

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
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                tokens, targets = examples[i]
                ids[row, :len(tokens)] = torch.tensor(tokens)
                labels[row, :len(targets)] = torch.tensor(targets)
                mask[row, :len(tokens)] = 1
            yield ids, labels, mask


def learning_rate(config: Schedule | TeacherConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak as progress (of the whole run) goes from 0 to 1."""
    return config.lr * warmup_cosine(step, config.warmup_steps, progress, floor=0.1)


def make_optimisers(config: Schedule, model: torch.nn.Module,
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


def train(config: Schedule, model: torch.nn.Module, examples, pad: int,
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
        ids, labels, mask = (t.to(device) for t in next(stream))
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        scaler.scale(loss).backward()
        for optimiser in optimisers:
            scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for optimiser in optimisers:
            scaler.step(optimiser)
            optimiser.zero_grad(set_to_none=True)
        scaler.update()
        tokens, done = tokens + int(mask.sum()), done + 1
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
