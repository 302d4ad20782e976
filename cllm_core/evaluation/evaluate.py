"""Stage 4: speed and quality of every model x method on the same prompts, in one run.

Each prompt is decoded by every (model, method) pair in a rotating order, after a warm-up, so machine drift
hits every pair alike. A sample per (prompt, model, method) holds the counts of the decoders' shared
conventions (`outputs.py`), the wall time, whether the output equals the same model's greedy AR output, the
extracted answer and its correctness, a repetition flag, and the scoring model's (the teacher's) mean per-token
log-likelihood of the output; `summarize` (summary.py) turns samples into one row per pair, with speedups against
a baseline pair (the teacher's AR) and quality that a worse model lowers even where accuracy says nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cllm_core.data.answers import CHECKS, extract_answer
from cllm_core.data.prompts import encode
from cllm_core.data.trajectories import repetitive
from cllm_core.engine.baselines import ar_generate, lookup_generate
from cllm_core.engine.errors import UserError
from cllm_core.engine.jacobi import greedy_generate, jacobi_generate, jacobi_steps
from cllm_core.evaluation import report
from cllm_core.evaluation.summary import Pair, mean_logprob, shortfalls, summarize
from cllm_core.evaluation.tuning import DecodingChoice
from cllm_core.runtime.config import EvalConfig, ModelConfig, chosen_block_size, trained_block_size
from cllm_core.runtime.records import Evaluation

LOOKUP_NGRAM = 2  # the longest n-gram Jacobi's drafts are matched on: transformers' prompt-lookup default


def decoders(config: EvalConfig) -> dict[str, Callable]:
    """The compared decoders, each `decode(model, ids, mask)`; Jacobi at `config.jacobi`'s block size (or 16)."""
    common, jacobi = {"max_new_tokens": config.jacobi.max_new_tokens}, config.jacobi.arguments()
    multiblock = {"blocks": config.multiblock.blocks, "open_at": config.multiblock.open_at}
    table = {"ar": partial(greedy_generate, **common),
             "generate": partial(ar_generate, **common),
             "jacobi": partial(jacobi_generate, **jacobi),
             "jacobi_lookup": partial(jacobi_generate, **jacobi, lookup=LOOKUP_NGRAM, lookup_branch=True),
             "jacobi_multiblock": partial(jacobi_generate, **jacobi, **multiblock),
             "jacobi_recycling": partial(jacobi_generate, **jacobi, **multiblock, pool=config.multiblock.pool),
             "lookup": partial(lookup_generate, prompt_lookup_num_tokens=config.lookup_tokens, **common)}
    return {method: table[method] for method in config.methods}


def evaluate(models: dict[str, torch.nn.Module], tokenizer, prompts: list[dict], chat: bool, config: EvalConfig,
             log: Callable[[str], None] = print, pairs: dict[Pair, Callable] | None = None,
             scorer: str | None = None) -> list[dict]:
    """Decode `prompts` (dicts with prompt_id, prompt, answer) with every model x method, or with the given
    `pairs` ((model, method) -> its `decode(model, ids, mask)`; a model's "ar" pair, if any, is what its exact
    match compares with); one sample each (a dict: a row of samples.parquet). Every output is scored by the
    `scorer` model's (default: the first) mean per-token log-likelihood, untimed.

    Batches of `config.batch_size` prompts are decoded together; a sample's seconds are then its batch's
    time shared equally among the rows.
    """
    if pairs is None:
        if config.jacobi.n_tokens is None:
            config = with_block_size(config, models, log)
        pairs = {(model, method): decode for model in models for method, decode in decoders(config).items()}
    order: list[Pair] = list(pairs)
    score = partial(mean_logprob, models[scorer or next(iter(models))])
    check = CHECKS["exact" if config.check == "auto" else config.check]
    warm = prompts[: config.batch_size]
    for model, method in order:  # kernels, allocator and caches settle before anything is timed
        ids, mask = encode(tokenizer, [p["prompt"] for p in warm], _device(models[model]), chat)
        for _ in range(config.warmup):
            pairs[model, method](models[model], ids, mask)
    samples = []
    for start in range(0, len(prompts), config.batch_size):
        batch = prompts[start:start + config.batch_size]
        chunk = start // config.batch_size
        ids, mask = encode(tokenizer, [p["prompt"] for p in batch], _device(models[order[0][0]]), chat)
        outputs = {}
        for model, method in order[chunk % len(order):] + order[: chunk % len(order)]:  # rotating order
            outputs[model, method] = _timed(pairs[model, method], models[model], ids, mask)
        for row, prompt in enumerate(batch):
            scored: dict[tuple, float] = {}  # equal outputs are scored once
            for (model, method), (seconds, out) in outputs.items():
                sample = _sample(prompt, model, method, row, ids.shape[1], seconds / len(batch), out,
                                 outputs.get((model, "ar")), tokenizer, check)
                response = tuple(out.response(row, ids.shape[1]))
                if response not in scored:
                    scored[response] = score(ids[row][mask[row].bool()].tolist(), list(response))
                samples.append(sample | {"baseline_logprob": scored[response]})
        log(f"{min(start + len(batch), len(prompts))}/{len(prompts)} prompts")
    return samples


def run_evaluation(config: EvalConfig, models: dict[str, ModelConfig], prompts_path: str | Path, out_dir: Path,
                   log: Callable[[str], None] = print, precision: str = "fp32",
                   warn: Callable[[str], None] | None = None) -> Evaluation:
    """Evaluate the named models (the first is the baseline: the teacher) on the eval prompts, their weights in
    the resolved `precision`; writes `samples.parquet`, `summary.json` and the PNGs to `out_dir`; returns the
    summary, the file paths and the precision."""
    from cllm_core.runtime.models import load_model, load_tokenizer, tokenizer_fingerprint
    from cllm_core.runtime.precision import DTYPES

    config = config.model_copy(update={"check": resolve_check(config, prompts_path)})
    prompts, chat = eval_prompts(prompts_path, config.limit)
    baseline = next(iter(models))
    tokenizer = load_tokenizer(models[baseline])
    vocabulary, loaded = tokenizer_fingerprint(tokenizer), {}
    for name, source in models.items():
        if tokenizer_fingerprint(load_tokenizer(source)) != vocabulary:
            raise UserError(f"{name} ({source.name_or_path}) uses another tokenizer than {baseline}; compare "
                            "models trained from the same teacher")
    used = decode_precisions(precision, models)
    for name, source in models.items():
        try:
            loaded[name] = load_model(source, DTYPES[used[name]])
        except (OSError, ValueError) as error:
            raise UserError(f"{name}: {source.name_or_path} is not a causal language model "
                            f"({str(error).splitlines()[0]})") from None
    config = with_block_size(config, loaded, log, {name: _decoding(source) for name, source in models.items()})
    log(f"evaluating {', '.join(models)} x {', '.join(config.methods)} on {len(prompts)} prompts, "
        f"batch {config.batch_size}, " + ", ".join(f"{name} in {p}" for name, p in used.items()))
    samples = evaluate(loaded, tokenizer, prompts, chat, config, log)
    summary = summarize(samples, (baseline, "ar"))
    for line in shortfalls(summary, (baseline, "ar")):
        (warn or log)(line)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(samples), out_dir / "samples.parquet")
    (out_dir / "summary.json").write_text(json.dumps([row.to_json() for row in summary], indent=2) + "\n")
    pictures = [report.speedup_bars(summary, out_dir / "speedup.png"),
                report.tokens_per_forward_histogram(samples, out_dir / "tokens_per_forward.png"),
                report.accuracy_vs_speed(summary, out_dir / "accuracy_vs_speed.png")]
    if "jacobi" in config.methods:
        ids, mask = encode(tokenizer, [prompts[0]["prompt"]], _device(loaded[baseline]), chat)
        for name, model in loaded.items():
            steps = jacobi_steps(model, ids, mask, **config.jacobi.arguments())
            pictures.append(report.trajectory_figure(
                [row for step in steps for row in step.rows], lambda t: tokenizer.decode([t]),
                out_dir / f"trajectory-{name}.png", f"{name}, prompt {prompts[0]['prompt_id'][:8]}"))
    return Evaluation(summary, str(out_dir / "samples.parquet"), [str(p) for p in pictures], len(prompts),
                      (baseline, "ar"), config.check, used[baseline], config.jacobi.model_dump())


def decode_precisions(setting: str, models: dict[str, ModelConfig]) -> dict[str, str]:
    """The precision each model decodes in: `setting` resolved on its device; with `auto`, a CLLM whose decoding
    choice was measured on this kind of machine in the precision measured fastest for it, and the baseline (the
    first model, the teacher) in the precision of the fastest AR that measurement found."""
    from cllm_core.runtime.precision import for_model, measured_choice

    resolved = {name: for_model(setting, source.name_or_path, source.device) for name, source in models.items()}
    used = {name: r.name for name, r in resolved.items()}
    measured = [measured_choice(models[name].name_or_path) for name, r in resolved.items() if r.measured]
    baseline = next(iter(models))
    if measured and not resolved[baseline].measured:
        used[baseline] = measured[-1]["ar_precision"]
    return used


def eval_prompts(prompts_path: str | Path, limit: int | None = None) -> tuple[list[dict], bool]:
    """The first `limit` prompts of an ingested prompts Parquet as dicts (prompt_id, prompt, answer), and
    whether they go through the chat template."""
    from cllm_core.data.collect import read_prompt_table

    table, chat = read_prompt_table(prompts_path, limit)
    answers = pq.read_table(prompts_path, columns=["answer"]).column("answer").slice(0, len(table)).to_pylist()
    return [row | {"answer": answer} for row, answer in zip(table.to_pylist(), answers)], chat


def with_block_size(config: EvalConfig, models: dict[str, torch.nn.Module], log: Callable[[str], None] = print,
                    trained_on: dict[str, dict] | None = None) -> EvalConfig:
    """The config with the block size every model decodes at: `evaluate.jacobi.n_tokens` when set, else the one
    measured fastest for the last CLLM among `models` after its training (cllm_core/evaluation/tuning.py), else the
    one the CLLMs were trained for (they must agree), else 16. Says in one line which and why, and how the CLLMs'
    trajectories were decoded (`trained_on`: model name -> the collection's Jacobi settings)."""
    jacobi = config.jacobi
    trained = {name: n for name, model in models.items() if (n := trained_block_size(model))}
    chosen = [name for name, model in models.items() if chosen_block_size(model)]
    if jacobi.n_tokens is None and not chosen and len(set(trained.values())) > 1:
        raise UserError(f"the CLLMs were trained for different block sizes ({_listed(trained)}); choose one with "
                        "--n-tokens (evaluate.jacobi.n_tokens)")
    if jacobi.n_tokens is None and chosen:  # the last CLLM: a pipeline's final one
        n = chosen_block_size(models[chosen[-1]])
        why = f"for {chosen[-1]}, {DecodingChoice.from_json(models[chosen[-1]].config.cllm_decoding).describe()}"
    else:
        n = jacobi.block_size(next((models[name] for name in trained), None))  # set, else as trained, else 16
        why = "evaluate.jacobi.n_tokens" if jacobi.n_tokens else "as trained" if trained else "no CLLM among the models"
    learned = [f"{name}'s from {_settings(settings)}" for name, settings in (trained_on or {}).items() if settings]
    log(f"Jacobi at n_tokens {n} ({why}{'; trained for ' + _listed(trained) if trained else ''}), "
        f"{_settings(jacobi.model_dump())}" + (f"; trajectories: {', '.join(learned)}" if learned else ""))
    return config.model_copy(update={"jacobi": jacobi.model_copy(update={"n_tokens": n})})


def _settings(jacobi: dict) -> str:
    return (f"init {jacobi.get('init')}, carry {'on' if jacobi.get('carry') else 'off'}, up to "
            f"{jacobi.get('max_new_tokens')} new tokens")


def _listed(mapping: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in mapping.items())


def _decoding(source: ModelConfig) -> dict:
    """How a CLLM's training trajectories were decoded, from the `cllm.json` beside it (empty for other models)."""
    path = Path(source.name_or_path) / "cllm.json"
    return json.loads(path.read_text()).get("trajectories", {}).get("decoding", {}) if path.is_file() else {}


def resolve_check(config: EvalConfig, prompts_path: str | Path) -> str:
    """The answer check: the config's, or with `auto` the preset's that `cllm ingest` recorded beside the prompts."""
    if config.check != "auto":
        return config.check
    from cllm_core.data.sources import PRESETS

    manifest = Path(prompts_path).parent / "manifest.json"
    ingest = json.loads(manifest.read_text()).get("config", {}) if manifest.is_file() else {}
    preset = PRESETS.get(ingest.get("preset") or ingest.get("source") or "")
    return preset.check if preset else "exact"


def _timed(decode, model, ids, mask):
    device = _device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = decode(model, ids, mask)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _sample(prompt, model, method, row, prompt_len, seconds, out, ar, tokenizer, check) -> dict:
    response = out.response(row, prompt_len)
    text = tokenizer.decode(response, skip_special_tokens=True)
    new_tokens, forwards = out.stats.row_new_tokens[row], out.stats.row_forwards[row]
    return {"prompt_id": prompt["prompt_id"], "model": model, "method": method, "new_tokens": new_tokens,
            "forwards": forwards, "tokens_per_forward": new_tokens / max(forwards, 1), "seconds": seconds,
            "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0,
            "fast_forward": out.stats.row_fast_forward[row], "stationary": out.stats.row_stationary[row],
            "matches_ar": ar is not None and response == ar[1].response(row, prompt_len),
            "answer": extract_answer(text), "correct": bool(prompt.get("answer")) and check(text, prompt["answer"]),
            "repetitive": repetitive(response), "response": text}


def _device(model) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device  # a parameter-free test double lives on the CPU
