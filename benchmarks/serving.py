"""One CLLM decoded five ways on the same prompts, interleaved prompt by prompt: the engine (`jacobi_generate`),
transformers' `generate(custom_generate=dir)` per call, the same bound once by `from_pretrained(dir,
trust_remote_code=True)`, the registered MLflow pyfunc in process, and `mlflow models serve` over HTTP on
127.0.0.1. Per way: tokens per forward, tokens/s, median seconds per request, and what it adds per
request over the engine (median of the per-prompt differences); every way's text must equal the engine's.

    python -m benchmarks.serving --model runs/demo/cllm-round2 --prompts runs/demo/prompts/eval.parquet \\
        --limit 40 --json runs/serving.json

The model is logged into a temporary MLflow store (sqlite) and served from there; the server is stopped at the
end. A directory trained before CLLMs shipped their decoding gets `custom_generate/` written first (as a rerun of
`cllm train` would). Batch 1, greedy, the directory's trained block size unless --n-tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from benchmarks import write_json
from cllm_core import ModelConfig, jacobi_generate, load_model, load_tokenizer
from cllm_core.data.prompts import encode
from cllm_core.evaluation.evaluate import eval_prompts
from cllm_core.training.shipping import SHIPPED, ship_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a CLLM directory")
    parser.add_argument("--prompts", type=Path, required=True, help="an ingested prompts Parquet (plain template)")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--n-tokens", type=int, help="block size (default: the directory's cllm_n_tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    prompts, chat = eval_prompts(args.prompts, args.limit)
    if chat:
        raise SystemExit(f"{args.prompts} holds prompts rendered with a chat template; the served model renders its "
                         "own, so give a plain-template prompt file")
    if not (args.model / SHIPPED).is_file():
        ship_generate(args.model)
        print(f"shipped {args.model / SHIPPED} (the directory predates shipped decoding)")
    source = ModelConfig(name_or_path=str(args.model))
    model, tokenizer = load_model(source), load_tokenizer(source)
    n_tokens = args.n_tokens or model.config.cllm_n_tokens
    print(f"{len(prompts)} prompts, n_tokens {n_tokens}, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as scratch:
        tracking = f"sqlite:///{scratch}/mlflow.db"
        pyfunc = register(args.model, tracking)
        port, server = serve(tracking)
        try:
            params = {"max_new_tokens": args.max_new_tokens, "n_tokens": n_tokens, "chat": False}
            bound = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
            ways = {"engine": lambda text: engine(model, tokenizer, text, n_tokens, args.max_new_tokens),
                    "hf_generate": lambda text: hf_generate(model, tokenizer, text, n_tokens, args.max_new_tokens,
                                                            custom_generate=str(args.model), trust_remote_code=True),
                    "hf_bound": lambda text: hf_generate(bound, tokenizer, text, n_tokens, args.max_new_tokens),
                    "pyfunc": lambda text: answer(pyfunc.predict(pd.DataFrame({"prompt": [text]}), params=params)),
                    "served": lambda text: request(port, text, params)}
            for way in ways.values():  # warm-up: kernels, the module cache, the server's first request
                way(prompts[0]["prompt"])
            results = {way: [] for way in ways}
            names = list(ways)
            for number, prompt in enumerate(prompts):  # the order rotates: no way always goes first
                for way in names[number % len(names):] + names[: number % len(names)]:
                    started = time.perf_counter()  # as its caller sees it, tokenizing included
                    done = ways[way](prompt["prompt"])
                    results[way].append(done | {"seconds": time.perf_counter() - started})
        finally:
            stop(server)
    rows = summarize(results)
    for row in rows:
        print(f"{row['way']:12s} {row['tokens_per_forward']:5.2f} tokens/forward  {row['tokens_per_s']:7.1f} tokens/s  "
              f"median {row['median_s'] * 1000:7.1f} ms/request  adds {row['adds_ms']:+7.1f} ms  "
              f"same text as the engine: {row['same_text']}/{len(prompts)}")
    write_json(args.json, {"model": str(args.model), "prompts": len(prompts), "n_tokens": n_tokens,
                           "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                           "platform": platform.platform(), "rows": rows,
                           "requests": {way: [[a["new_tokens"], a["forwards"], a["seconds"]] for a in answers]
                                        for way, answers in results.items()}})


def engine(model, tokenizer, text: str, n_tokens: int, max_new_tokens: int) -> dict:
    ids, mask = encode(tokenizer, [text], chat=False)
    out = jacobi_generate(model, ids, mask, n_tokens=n_tokens, max_new_tokens=max_new_tokens,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out.response(0, ids.shape[1])
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
            "forwards": out.stats.forwards}


def hf_generate(model, tokenizer, text: str, n_tokens: int, max_new_tokens: int, **custom) -> dict:
    """`generate` with the shipped method: per call (`custom`: custom_generate=dir, trust_remote_code=True), or
    bound once by `from_pretrained(dir, trust_remote_code=True)` (no `custom`)."""
    ids, mask = encode(tokenizer, [text], chat=False)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, n_tokens=n_tokens,
                             max_new_tokens=max_new_tokens, **custom)
    new = out.sequences[0, ids.shape[1]:][: out.new_tokens[0]]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
            "forwards": out.forwards}


def register(directory: Path, tracking: str):
    """Log and register the CLLM as `log_cllm` does in the pipeline; the pyfunc loaded back from the registry."""
    import mlflow

    from tasks.finetune import log_cllm

    mlflow.set_tracking_uri(tracking)
    with mlflow.start_run():
        log_cllm.fn(directory, "cllm")
    return mlflow.pyfunc.load_model("models:/cllm/1")


def serve(tracking: str) -> tuple[int, subprocess.Popen]:
    """`mlflow models serve` of the registered version on a free port of 127.0.0.1 (its own process group)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking,
                        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cllm/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = time.perf_counter()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
            break
        except OSError:
            if server.poll() is not None or time.perf_counter() - started > 180:
                stop(server)
                raise SystemExit("mlflow models serve did not come up (run it by hand to see why)") from None
            time.sleep(0.5)
    print(f"mlflow models serve up on 127.0.0.1:{port} in {time.perf_counter() - started:.1f} s")
    return port, server


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def request(port: int, text: str, params: dict) -> dict:
    body = json.dumps({"dataframe_records": [{"prompt": text}], "params": params}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={
            "Content-Type": "application/json"}), timeout=120) as response:
        (row,) = json.loads(response.read())["predictions"]
    return row


def answer(frame) -> dict:
    (row,) = frame.to_dict("records")
    return row


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    base = results["engine"]
    rows = []
    for way, answers in results.items():
        tokens, forwards = sum(a["new_tokens"] for a in answers), sum(a["forwards"] for a in answers)
        seconds = [a["seconds"] for a in answers]
        rows.append({"way": way, "tokens_per_forward": tokens / forwards, "tokens_per_s": tokens / sum(seconds),
                     "median_s": statistics.median(seconds),
                     "adds_ms": 1000 * statistics.median(a["seconds"] - b["seconds"] for a, b in zip(answers, base)),
                     "same_text": sum(a["text"] == b["text"] for a, b in zip(answers, base))})
    return rows


if __name__ == "__main__":
    main()
