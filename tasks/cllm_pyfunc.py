"""The registered CLLM as an MLflow pyfunc that decodes with Jacobi (MLflow's models-from-code: this file is
stored with the model and run where it is loaded).

    mlflow.pyfunc.load_model("models:/cllm/1").predict(pd.DataFrame({"prompt": ["..."]}), params={"max_new_tokens": 64})
    mlflow models serve -m models:/cllm/1 --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"prompt": "..."}], "params": {"max_new_tokens": 64}}'

`predict` decodes each prompt through the model directory's own `custom_generate/generate.py` (the engine,
shipped with the CLLM), so loading it needs MLflow, torch and transformers, not this project. Each answer row
carries the text, new tokens, forward passes and tokens per forward. Params: max_new_tokens, n_tokens (default:
the block size the CLLM was trained with), chat (render the prompt with the tokenizer's chat template; default:
whether it has one).
"""

from __future__ import annotations

import time

import mlflow
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class CllmPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.directory = context.artifacts["cllm"]
        # trust_remote_code binds the directory's own custom_generate/generate.py as `generate`, once: passing
        # custom_generate=dir to every call would resolve and import the file again each time (about 20 ms)
        self.model = AutoModelForCausalLM.from_pretrained(self.directory, trust_remote_code=True).eval()
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
            inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(**inputs, return_dict_in_generate=True, **options)
            new = out.sequences[0, inputs["input_ids"].shape[1]:][: out.new_tokens[0]]
            rows.append({"text": self.tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
                         "forwards": out.forwards, "tokens_per_forward": out.tokens_per_forward,
                         "seconds": time.perf_counter() - started})
        return pd.DataFrame(rows, columns=["text", "new_tokens", "forwards", "tokens_per_forward", "seconds"])


def _prompts(model_input) -> list[str]:
    """Prompt texts from the `prompt` column (MLflow turns a request's records into this DataFrame)."""
    if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
        raise ValueError("the input needs a 'prompt' column: pd.DataFrame({'prompt': [...]}) or, over HTTP, "
                         '{"dataframe_records": [{"prompt": "..."}]}')
    return [str(p) for p in model_input["prompt"]]


mlflow.models.set_model(CllmPyfunc())
