"""The registered CLLM as an MLflow pyfunc that decodes with Jacobi (MLflow's models-from-code: this file is
stored with the model and run where it is loaded).

    mlflow.pyfunc.load_model("models:/cllm/1").predict(pd.DataFrame({"prompt": ["..."]}), params={"max_new_tokens": 64})
    mlflow models serve -m models:/cllm/1 --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"prompt": "..."}], "params": {"max_new_tokens": 64}}'

`predict` decodes each prompt through the model directory's own `custom_generate/generate.py` (the engine,
shipped with the CLLM), so loading it needs MLflow, torch and transformers, not this project. Each answer row
carries the text, new tokens, forward passes and tokens per forward. Params: max_new_tokens, n_tokens (default:
the block size measured fastest for the CLLM after its training, else the one it was trained with), chat (render
the prompt with the tokenizer's chat template; default: whether it has one). The weights load in the precision
measured fastest for the CLLM when that measurement was made on this kind of machine (fp32 otherwise), on the
first CUDA GPU when there is one, else the CPU; $CLLM_DEVICE (cpu, cuda, cuda:1) names another.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEVICE_VARIABLE = "CLLM_DEVICE"


class CllmPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.directory = context.artifacts["cllm"]
        # trust_remote_code binds the directory's own custom_generate/generate.py as `generate`, once: passing
        # custom_generate=dir to every call would resolve and import the file again each time (about 20 ms)
        self.device = _device()
        self.model = AutoModelForCausalLM.from_pretrained(self.directory, trust_remote_code=True,
                                                          dtype=_measured_dtype(self.directory, self.device))
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.directory)

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        prompts = _prompts(model_input)
        chat = bool(params.get("chat", bool(self.tokenizer.chat_template))) and bool(self.tokenizer.chat_template)
        options = {"max_new_tokens": int(params.get("max_new_tokens", 256))}
        if params.get("n_tokens"):
            options["n_tokens"] = int(params["n_tokens"])
        rows = []
        for prompt in prompts:  # one at a time: each answer's own tokens per forward, batch-1 latency
            if chat:
                prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                            add_generation_prompt=True)
            inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).to(self.device)
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(**inputs, return_dict_in_generate=True, **options)
            new = out.sequences[0, inputs["input_ids"].shape[1]:][: out.new_tokens[0]]
            rows.append({"text": self.tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
                         "forwards": out.forwards, "tokens_per_forward": out.tokens_per_forward,
                         "seconds": time.perf_counter() - started})
        return pd.DataFrame(rows, columns=["text", "new_tokens", "forwards", "tokens_per_forward", "seconds"])


def _device() -> torch.device:
    """Where the model serves: $CLLM_DEVICE (cpu, cuda, cuda:1) if set, else the first CUDA GPU if there is one."""
    named = os.environ.get(DEVICE_VARIABLE)
    if named:
        device = torch.device(named)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{DEVICE_VARIABLE}={named}: this machine has no CUDA GPU that torch can use")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _measured_dtype(directory: str, device: torch.device) -> torch.dtype:
    """The precision measured fastest for this CLLM (`cllm_decoding` in its config), if measured on this kind of
    machine (the CPU's kernel class or the GPU's name, as cllm_core/runtime/precision.py names them); fp32 otherwise."""
    choice = json.loads((Path(directory) / "config.json").read_text()).get("cllm_decoding") or {}
    here = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.backends.cpu.get_cpu_capability()})")
    named = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return named.get(choice.get("precision"), torch.float32) if choice.get("device") == here else torch.float32


def _prompts(model_input) -> list[str]:
    """Prompt texts from the `prompt` column (MLflow turns a request's records into this DataFrame)."""
    if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
        raise ValueError("the input needs a 'prompt' column: pd.DataFrame({'prompt': [...]}) or, over HTTP, "
                         '{"dataframe_records": [{"prompt": "..."}]}')
    return [str(p) for p in model_input["prompt"]]


mlflow.models.set_model(CllmPyfunc())
