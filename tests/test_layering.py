"""cllm_core stays pure: importing it loads neither Prefect nor MLflow."""

import subprocess
import sys


def test_cllm_core_imports_neither_prefect_nor_mlflow():
    code = ("import sys, cllm_core, cllm_core.models, cllm_core.prompts; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
