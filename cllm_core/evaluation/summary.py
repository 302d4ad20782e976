"""An evaluation's samples summed up: one row per (model, method) with its speedup against the baseline pair (the
teacher's AR), and the quality a worse model lowers even where accuracy says nothing: final answers equal to the
baseline's, outputs identical to it, and the scoring model's mean per-token log-likelihood of them; the shortfalls
that make an evaluation fail loudly."""

from __future__ import annotations

import math
import statistics

import torch

from cllm_core.runtime.records import SummaryRow

Pair = tuple[str, str]  # (model name, method)


ACCURACY_DROP = 0.10
"""A model this far below the baseline's accuracy is said loudly (a CLLM that collapsed: LoRA at too high a rate)."""


def shortfalls(summary: list[SummaryRow], baseline: Pair) -> list[str]:
    """One line per model whose accuracy, with any of its methods, falls more than `ACCURACY_DROP` below the
    baseline pair's; the evaluation still reports it (its table is what shows how far)."""
    base = next((row.accuracy for row in summary if (row.model, row.method) == baseline), None)
    lines, said = [], set()
    for row in summary:
        if base is not None and row.model not in said and row.accuracy < base - ACCURACY_DROP:
            said.add(row.model)
            lines.append(f"{row.model} answers {row.accuracy:.1%} right with {row.method} against {baseline[0]}'s "
                         f"{base:.1%} ({baseline[1]}): more than {ACCURACY_DROP:.0%} below it, it is not fit to "
                         "replace it; check its training (finetune.lr, LoRA's rate, steps) before using it")
    return lines


def summarize(samples: list[dict], baseline: Pair = ("teacher", "ar")) -> list[SummaryRow]:
    """One row per (model, method): tokens per forward, tokens/s, speedups vs the baseline pair (total tokens
    over total time, and the mean of per-prompt ratios), accuracy, exact match vs the model's AR, repetition."""
    by_pair: dict[Pair, list[dict]] = {}
    for sample in samples:
        by_pair.setdefault((sample["model"], sample["method"]), []).append(sample)
    base = {r["prompt_id"]: r for r in by_pair.get(baseline, [])}
    base_speed = _speed(by_pair[baseline]) if baseline in by_pair else None
    rows = []
    for (model, method), group in by_pair.items():
        tokens, forwards = sum(r["new_tokens"] for r in group), sum(r["forwards"] for r in group)
        speeds = {}
        if base_speed:
            ratios = [r["tokens_per_s"] / base[r["prompt_id"]]["tokens_per_s"] for r in group
                      if r["prompt_id"] in base and base[r["prompt_id"]]["tokens_per_s"] > 0]
            speeds = {"speedup": _speed(group) / base_speed,
                      "mean_speedup": statistics.fmean(ratios) if ratios else float("nan")}
        paired = [(r, base[r["prompt_id"]]) for r in group if r["prompt_id"] in base and "response" in r]
        if paired:
            speeds |= {"answer_agreement": _mean(r["answer"] == b["answer"] for r, b in paired),
                       "same_as_baseline": _mean(r["response"] == b["response"] for r, b in paired)}
        if any("baseline_logprob" in r for r in group):
            speeds["baseline_logprob"] = _mean(r["baseline_logprob"] for r in group
                                               if not math.isnan(r.get("baseline_logprob", math.nan)))
        rows.append(SummaryRow(
            model, method, prompts=len(group), new_tokens=tokens, forwards=forwards,
            tokens_per_forward=tokens / max(forwards, 1), tokens_per_s=_speed(group),
            seconds=sum(r["seconds"] for r in group), accuracy=_mean(r["correct"] for r in group),
            exact_match=_mean(r["matches_ar"] for r in group), repetition_rate=_mean(r["repetitive"] for r in group),
            fast_forward=sum(r["fast_forward"] for r in group), stationary=sum(r["stationary"] for r in group),
            **speeds))
    return rows


@torch.no_grad()
def mean_logprob(model, prompt: list[int], response: list[int]) -> float:
    """`model`'s mean per-token log-likelihood of `response` after `prompt` (NaN for an empty response)."""
    if not response:
        return float("nan")
    ids = torch.tensor([prompt + response], device=next(model.parameters(), torch.empty(0)).device)
    logits = model(input_ids=ids, logits_to_keep=len(response) + 1).logits[0, :-1].float()  # (R, V)
    targets = torch.tensor(response, device=logits.device)[:, None]
    return logits.log_softmax(-1).gather(-1, targets).mean().item()


def identical_to(samples: list[dict], baseline: Pair = ("teacher", "ar")) -> dict[Pair, float]:
    """Per (model, method): the share of its outputs identical to the baseline pair's output on the same prompt."""
    reference = {s["prompt_id"]: s["response"] for s in samples if (s["model"], s["method"]) == baseline}
    same: dict[Pair, list[bool]] = {}
    for sample in samples:
        same.setdefault((sample["model"], sample["method"]), []).append(
            sample["response"] == reference[sample["prompt_id"]])
    return {pair: sum(flags) / len(flags) for pair, flags in same.items()}


def _speed(group: list[dict]) -> float:
    seconds = sum(r["seconds"] for r in group)
    return sum(r["new_tokens"] for r in group) / seconds if seconds > 0 else 0.0


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")
