"""The registered CLLM decodes with Jacobi wherever MLflow takes it: the pyfunc loaded from the registry returns the
engine's text and tokens per forward, the version's page says how to serve it, and a real `mlflow models serve`
on 127.0.0.1 answers an HTTP request with the same output, then is stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import mlflow
import pandas as pd
import pytest
import torch

from cllm_core import ModelConfig, jacobi_generate, load_model, load_tokenizer
from cllm_core.data.prompts import encode, render
from cllm_core.training.shipping import ship_generate
from tasks.finetune import log_cllm
from tests.servers import free_port, wait_healthy

pytestmark = pytest.mark.slow
PROMPTS = ["Add 3 and 4", "What is 12 minus 5?"]


@pytest.fixture
def registered(tmp_path, tiny_model_dir, tracking):
    """A tiny CLLM directory (block size 4, the shipped generate) logged and registered as `cllm` v1."""
    directory = tmp_path / "cllm"
    shutil.copytree(tiny_model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"cllm_n_tokens": 4}))
    ship_generate(directory)
    mlflow.set_tracking_uri(tracking)
    with mlflow.start_run():
        logged = log_cllm.fn(directory, "cllm")
    return directory, logged


def engine_answers(directory, max_new_tokens):
    """What the engine decodes for PROMPTS (in the chat template) at block size 4: texts and tokens per forward."""
    source = ModelConfig(name_or_path=str(directory))
    model, tokenizer = load_model(source), load_tokenizer(source)
    answers = []
    for prompt in PROMPTS:
        ids, mask = encode(tokenizer, [render(tokenizer, prompt)])
        out = jacobi_generate(model, ids, mask, n_tokens=4, max_new_tokens=max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out.response(0, ids.shape[1])
        answers.append((tokenizer.decode(new, skip_special_tokens=True), len(new) / out.stats.forwards))
    return answers


def test_the_registered_pyfunc_decodes_as_the_engine_and_its_page_says_how_to_serve_it(registered):
    directory, logged = registered
    assert logged["version"] == 1 and logged["registered_model"] == "cllm"
    model = mlflow.pyfunc.load_model("models:/cllm/1")
    params = model.metadata.get_params_schema().to_dict()
    assert {p["name"]: p["default"] for p in params} == {"max_new_tokens": 256, "n_tokens": 4, "chat": True}
    answers = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 24})
    expected = engine_answers(directory, 24)
    assert answers["text"].tolist() == [text for text, _ in expected]
    assert answers["tokens_per_forward"].tolist() == pytest.approx([tpf for _, tpf in expected])
    version = mlflow.MlflowClient().get_model_version("cllm", "1")
    assert "mlflow models serve -m models:/cllm/1" in version.description
    assert "custom_generate=dir" in version.description
    assert "mlflow models serve -m models:/cllm/<version>" in mlflow.MlflowClient().get_registered_model(
        "cllm").description


def test_mlflow_models_serve_answers_on_localhost_with_the_jacobi_output(registered, tracking):
    directory, _ = registered
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)  # `mlflow models serve` runs `uvicorn` from PATH, as in an active venv
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cllm/1",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/ping", seconds=120)
        except TimeoutError:
            stop(server)
            raise AssertionError(server.stderr.read()[-3000:].decode()) from None
        body = json.dumps({"dataframe_records": [{"prompt": p} for p in PROMPTS],
                           "params": {"max_new_tokens": 24}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answers = json.loads(response.read())["predictions"]
    finally:
        stop(server)
    expected = engine_answers(directory, 24)
    assert [a["text"] for a in answers] == [text for text, _ in expected]
    assert [a["tokens_per_forward"] for a in answers] == pytest.approx([tpf for _, tpf in expected])
    with pytest.raises(OSError):  # stopped: nothing listens on the port any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)


def stop(server: subprocess.Popen) -> None:
    """The server and what it started (uvicorn and its worker): its whole process group."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_pyfunc_serves_on_a_gpu_when_there_is_one_or_where_cllm_device_says(monkeypatch):
    """It always served on the CPU (#32.3). It is stored with the model and loaded without this project: it
    imports none of it."""
    import ast
    from pathlib import Path

    import tasks.cllm_pyfunc as pyfunc

    source = Path(pyfunc.__file__).read_text()
    imported = {n.module or "" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m.split(".")[0] in ("cllm_core", "flows", "tasks")]
    monkeypatch.delenv(pyfunc.DEVICE_VARIABLE, raising=False)
    assert pyfunc._device() == torch.device("cpu")  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pyfunc._device() == torch.device("cuda")
    monkeypatch.setenv(pyfunc.DEVICE_VARIABLE, "cpu")
    assert pyfunc._device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(pyfunc.DEVICE_VARIABLE, "cuda:1")
    with pytest.raises(ValueError, match="CLLM_DEVICE=cuda:1: this machine has no CUDA GPU"):
        pyfunc._device()
