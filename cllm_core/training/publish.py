"""A trained CLLM published: an ordinary HF directory written in one step, with its record (`cllm.json`), the
block size and precision measured fastest for it, and the engine it ships (`custom_generate/generate.py`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate.utils import DistributedType
from transformers import GenerationConfig

from cllm_core.evaluation.tuning import DecodingChoice, choose_decoding
from cllm_core.runtime.files import publish_dir
from cllm_core.runtime.precision import resolve
from cllm_core.runtime.records import CllmRecord
from cllm_core.training.setup import Training
from cllm_core.training.shipping import ship_generate


def publish(run: Training, metrics: dict, log: Callable[[str], None]) -> CllmRecord:
    """Save the CLLM with its record (`cllm.json`) into `out_dir` in one step, from the main process; drop the
    checkpoints. Every process returns the published record."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(run.lm)  # whole on the main process (a collective under FSDP)
    if accelerator.is_main_process:  # one writer; the other processes read the record once it is published
        trained = accelerator.unwrap_model(run.lm)
        trained = trained.merge_and_unload() if run.config.lora else trained  # an ordinary model for what follows
        if run.config.decoding_sizes and accelerator.distributed_type != DistributedType.FSDP:
            choice = decoding_choice(trained, run, log)
            trained.config.cllm_decoding = choice.to_json()
            metrics = metrics | {"decoding_n_tokens": choice.n_tokens, "decoding_speedup": choice.speedup}
        record = CllmRecord(run.config.model_dump(), run.fingerprint, run.precision, run.model.model_dump(),
                            {"store": run.store, "fingerprint": run.data.fingerprint, "decoding": run.data.decoding},
                            run.data.n_tokens, metrics, run.history)
        with publish_dir(run.out_dir) as staging:
            save_cllm(trained, run.tokenizer, staging, record, None if run.config.lora else weights)
        if not metrics["stopped_early"]:  # a run its guard stopped keeps its checkpoint: the next resumes there
            shutil.rmtree(run.checkpoints.root, ignore_errors=True)
        log(f"saved the CLLM to {run.out_dir} after {metrics['train_steps']} steps in "
            f"{metrics['train_seconds']:.0f} s")
    accelerator.wait_for_everyone()
    return CllmRecord.from_json(json.loads((run.out_dir / "cllm.json").read_text()), path=str(run.out_dir))


def decoding_choice(lm, run: Training, log: Callable[[str], None]) -> DecodingChoice:
    """The block size and precision the trained model decodes fastest with here (cllm_core/evaluation/tuning.py),
    measured on a few of its training prompts; said in one line."""
    rows = run.data.trained_rows[:DECODING_PROMPTS]
    prompts = [run.data.rows[row]["prompt_ids"] for row in rows]
    device = next(lm.parameters()).device
    precisions = ["fp32"] + (["bf16"] if resolve("auto", device).name == "bf16" else [])
    choice = choose_decoding(lm, prompts, precisions, tuple(run.config.decoding_sizes),
                             min(DECODING_NEW_TOKENS, run.data.decoding.get("max_new_tokens") or DECODING_NEW_TOKENS),
                             eos_token_id=run.tokenizer.eos_token_id)
    log(choice.describe())
    return choice

DECODING_PROMPTS, DECODING_NEW_TOKENS = 4, 128  # what the choice decodes: a minute or two of a CPU


def save_cllm(lm, tokenizer, directory: Path, record: CllmRecord, weights: dict | None = None) -> None:
    """An HF directory `from_pretrained` loads as is, with `cllm_n_tokens` in its config, `cllm.json`, and the
    engine as `custom_generate/generate.py` (transformers' `generate(custom_generate=dir)` decodes with Jacobi)."""
    lm.config.cllm_n_tokens = record.n_tokens
    lm.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id, do_sample=False)
    lm.save_pretrained(directory, state_dict=weights)  # weights: gathered from FSDP's shards
    tokenizer.save_pretrained(directory)
    ship_generate(directory)
    (directory / "cllm.json").write_text(json.dumps(record.stored(), indent=2, sort_keys=True, default=str) + "\n")
