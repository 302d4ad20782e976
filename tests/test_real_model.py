"""The real-model path: SmolLM2-135M-Instruct, shipped as GGUF, through `cllm run` end to end on a handful of
GSM8K prompts (configs/smollm2-smoke.yaml), read back from MLflow and from the CLLM directory."""

from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.slow  # SmolLM2 through the Prefect layer: about two minutes on 2 cores

ROOT = Path(__file__).parents[1]


def test_smollm2_becomes_a_cllm_that_loads_as_an_ordinary_model_and_decodes_exactly(prefect_server, tracking,
                                                                                    tmp_path):
    """Regression: a model loaded from GGUF kept transformers' GGUF quantizer, so `save_pretrained` of the
    fine-tuned CLLM refused ("quantized with gguf and is not serializable") after the whole collection."""
    import torch
    from transformers import AutoModelForCausalLM

    from cllm_core import ModelConfig, ar_generate, jacobi_generate, load_tokenizer
    from cllm_core.data.collect import read_prompt_table
    from cllm_core.data.prompts import encode

    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["run", "--config", str(ROOT / "configs/smollm2-smoke.yaml"), "--work-dir",
                                      str(work), "--set", f"ingest.source={ROOT / 'data/gsm8k_sample.jsonl'}",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| cllm | jacobi |" in result.output

    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("cllm").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["cllm.stage"] == "pipeline"]
    children = {r.data.tags["cllm.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"ingest", "collect", "finetune", "evaluate"}
    assert parent.data.params["model.gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    finetune = children["finetune"].data
    assert finetune.metrics["train_steps"] == 2 and finetune.params["n_tokens"] == "8"
    for pair in ("teacher.jacobi", "cllm.jacobi"):  # Jacobi output equals the same model's greedy output
        assert parent.data.metrics[f"{pair}.exact_match"] == 1.0
    (version,) = client.search_model_versions("name='cllm'")
    assert version.run_id == children["finetune"].info.run_id

    cllm = AutoModelForCausalLM.from_pretrained(work / "cllm", dtype=torch.float32).eval()  # no GGUF, no quantizer
    assert getattr(cllm, "hf_quantizer", None) is None and cllm.config.cllm_n_tokens == 8
    chosen = cllm.config.cllm_decoding  # measured on SmolLM2 after training: the evaluation decodes with it
    assert children["evaluate"].data.params["n_tokens"] == str(chosen["n_tokens"])
    assert finetune.metrics["decoding_n_tokens"] == chosen["n_tokens"] and chosen["speedup"] > 0
    assert 130e6 < cllm.num_parameters() < 140e6
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(work / "cllm")))
    prompts, chat = read_prompt_table(work / "prompts/eval.parquet")
    assert chat and prompts.num_rows == 1
    ids, mask = encode(tokenizer, prompts.column("prompt").to_pylist(), cllm.device, chat)
    greedy = ar_generate(cllm, ids, mask, max_new_tokens=16)
    jacobi = jacobi_generate(cllm, ids, mask, n_tokens=8, max_new_tokens=16)
    assert jacobi.sequences.tolist() == greedy.sequences.tolist()
    assert tokenizer.decode(ids[0][mask[0].bool()]).startswith("<|im_start|>")  # the chat template

    # the step benchmark on the run's own trajectories: its figures are produced and agree with each other
    import json
    import subprocess
    import sys

    out = tmp_path / "train_step.json"
    subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--config", str(ROOT / "configs/smollm2-smoke.yaml"),
                    "--store", str(work / "trajectories"), "--rounds", "1", "--precisions", "fp32", "--batch-size",
                    "2", "--json", str(out)], check=True, cwd=ROOT, capture_output=True)
    figures = json.loads(out.read_text())
    variants = {v["variant"]: v for v in figures["variants"]}
    assert set(variants) == {"cllm", "jacobi_forcing, a response a row", "jacobi_forcing"}
    for v in variants.values():
        assert v["seconds_per_step"] > 0 and 0 <= v["padding_share"] < 1 and 0 < v["share_of_peak"]
        assert v["tokens_per_s"] == pytest.approx(v["real_tokens_per_step"] / v["seconds_per_step"])
        assert v["minutes_per_epoch"] == pytest.approx(v["steps_per_epoch"] * v["seconds_per_step"] / 60)
    packed, alone = variants["jacobi_forcing"], variants["jacobi_forcing, a response a row"]
    assert packed["real_tokens_per_step"] == alone["real_tokens_per_step"]  # the same responses, less padding
    assert packed["fed_tokens_per_step"] <= alone["fed_tokens_per_step"]
    assert min(figures["matmul_peak_gflops"]["fp32"].values()) > 0 and sum(figures["profile"]["seconds"].values()) > 0
