"""The block size and precision a CLLM decodes fastest with on the machine at hand, chosen by measurement.

What a Jacobi pass costs against an AR step depends on the hardware and the precision (on one AVX-512 CPU a 17-token
pass cost 1.16 AR steps in bf16 with native bf16 but 2.0 in fp32, where AR itself ran 1.43x faster than in bf16), and
what a pass gains, tokens per forward, depends on the block size. Speed is their ratio: tokens per forward at each
size (measured by decoding a few prompts at batch 1) over the seconds of a forward that feeds as many tokens as
those decodes fed a pass on average, timed here in each precision over a cache of a typical context; against the
fastest AR step among the precisions. The choice is stored in the CLLM's config (`cllm_decoding`), so `generate`,
the MLflow model, `cllm decode` and the evaluation decode with it unless told otherwise.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from cllm_core.engine.jacobi import jacobi_generate
from cllm_core.runtime.precision import device_name

SIZES = (8, 16, 32, 64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Candidate:
    """One (block size, precision): tokens per forward, tokens fed a pass, a pass's time and the speed they give."""

    n_tokens: int
    precision: str
    tokens_per_forward: float
    fed_per_pass: float
    pass_ms: float
    tokens_per_s: float
    speedup: float  # over the fastest AR measured here


@dataclass(frozen=True)
class DecodingChoice:
    """The fastest candidate, the fastest AR it is set against, where it was measured, and every candidate."""

    n_tokens: int
    precision: str
    speedup: float
    ar_precision: str
    ar_tokens_per_s: float
    device: str
    candidates: list[Candidate]

    def describe(self) -> str:
        ranked = sorted(self.candidates, key=lambda c: -c.speedup)
        best = next((c for c in ranked if (c.n_tokens, c.precision) == (self.n_tokens, self.precision)), None)
        figures = f"{best.tokens_per_forward:.2f} tokens per forward at {best.pass_ms:.1f} ms a pass, " if best else ""
        others = [c for c in ranked if c is not best][:2]
        return (f"decoding at n_tokens {self.n_tokens} in {self.precision}: {figures}{self.speedup:.2f}x the fastest "
                f"AR ({self.ar_precision}, {self.ar_tokens_per_s:.1f} tokens/s) on {self.device}"
                + ("; next: " + ", ".join(f"n {c.n_tokens} {c.precision} {c.speedup:.2f}x" for c in others)
                   if others else ""))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DecodingChoice:
        return cls(**(data | {"candidates": [Candidate(**c) for c in data["candidates"]]}))


@torch.no_grad()
def choose_decoding(model, prompts: list[list[int]], precisions: list[str], sizes: tuple[int, ...] = SIZES,
                    max_new_tokens: int = 128, eos_token_id=None, repeats: int = 5) -> DecodingChoice:
    """Measure tokens per forward at each of `sizes` (decoding `prompts`, token ids, at batch 1 in the model's own
    dtype) and a pass's and an AR step's time in each of `precisions`; the fastest (size, precision)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    decoded = {}
    for n in sizes:
        tokens = forwards = fed = 0
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            stats = jacobi_generate(model, ids, n_tokens=n, max_new_tokens=max_new_tokens,
                                    eos_token_id=eos_token_id).stats
            tokens, forwards, fed = tokens + stats.new_tokens, forwards + stats.forwards, fed + stats.fed_tokens
        decoded[n] = (tokens / max(forwards, 1), fed / max(forwards, 1))
    context = round(statistics.fmean(len(p) for p in prompts)) + max_new_tokens // 2
    timed = {}
    for precision in precisions:
        cast = model if DTYPES[precision] == next(model.parameters()).dtype else copy.deepcopy(model).to(
            DTYPES[precision])
        timed[precision] = {fed: forward_seconds(cast, context, fed, repeats)
                            for fed in {1} | {max(1, round(f)) for _, f in decoded.values()}}
        del cast
    model.train(was_training)
    ar_precision = min(precisions, key=lambda p: timed[p][1])
    ar_speed = 1 / timed[ar_precision][1]
    candidates = [Candidate(n, p, tpf, fed, 1e3 * timed[p][max(1, round(fed))],
                            tpf / timed[p][max(1, round(fed))], tpf / timed[p][max(1, round(fed))] / ar_speed)
                  for n, (tpf, fed) in decoded.items() for p in precisions]
    best = max(candidates, key=lambda c: c.speedup)
    return DecodingChoice(best.n_tokens, best.precision, best.speedup, ar_precision, ar_speed, device_name(device),
                          candidates)


def forward_seconds(model, context: int, fed: int, repeats: int = 5) -> float:
    """Median seconds of a forward feeding `fed` tokens over a KV cache of `context` tokens (after one warm-up)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(device)
    block = torch.randint(0, model.config.vocab_size, (1, fed), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, past_key_values=cache, use_cache=True)
    positions = torch.arange(context, context + fed, device=device)[None]
    seconds = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=block, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=fed)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        cache.crop(-fed)  # back to the context (transformers 5: a negative count removes that many)
    return statistics.median(seconds[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
