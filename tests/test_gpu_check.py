"""The GPU check script runs here too, on the CPU at its small size, so that it never rots before a GPU is at hand
(its figures are the benchmark's; the test checks that they are produced and consistent)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow  # tiny models through every section: about a minute on 2 cores
def test_the_gpu_check_runs_on_a_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([str(ROOT / "scripts/gpu_check.sh"), "--device", "cpu", "--size", "small", "--json",
                           str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHON": str(Path(os.sys.executable))})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu (")
    assert set(result["exactness"]["models"]) >= {"llama", "qwen2", "gpt2"}
    assert all(m["fp32_equal"] and 0 <= m["bf16_identical_share"] <= 1 for m in result["exactness"]["models"].values())
    assert result["decode"]["ar_tokens_per_s"] > 0 and result["decode"]["speedup"] == pytest.approx(
        result["decode"]["jacobi_tokens_per_s"] / result["decode"]["ar_tokens_per_s"])
    assert result["collection"]["same_tokens"] and result["collection"]["packed_over_padded"] > 0
    assert set(result["train"]["runs"]) == {"cllm", "cllm lora", "jacobi_forcing", "jacobi_forcing lora"}
    assert all(r["steps"] == 2 and r["seconds_per_step"] > 0 for r in result["train"]["runs"].values())
    assert result["fsdp"]["skipped"].startswith("FSDP runs on CUDA devices only")
    assert "| Jacobi = greedy, fp32, llama | yes;" in done.stdout
