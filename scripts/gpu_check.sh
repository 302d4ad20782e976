#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py): Jacobi against greedy on CUDA, batch-1 decoding, packed against padded
# collection, training steps (full and LoRA, both objectives) with their peak memory, and one FSDP step, as one table
# and a JSON file. Made for a GPU machine without network, in one call of at most 8 minutes:
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--size small|full] [--cllm DIR] [--json FILE]
#
# What such a machine lacks (pydantic, datasets and theirs) is installed from wheels carried with the checkout:
# `scripts/gpu_wheels.sh` downloads them, for the machine's Python, into .gpu-wheels/ where PyPI is reachable
# (WHEELS=DIR names another folder). The slow test tier runs it on a CPU at --size small, so it does not rot.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi)}
WHEELS=${WHEELS:-.gpu-wheels}
missing=$("$PYTHON" - <<'PY'
import importlib.util
needed = {"pydantic": "pydantic", "datasets": "datasets", "yaml": "pyyaml", "pyarrow": "pyarrow",
          "accelerate": "accelerate", "peft": "peft"}
print(" ".join(package for module, package in needed.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu check: this Python lacks $missing and $WHEELS holds no wheels; run scripts/gpu_wheels.sh where PyPI is reachable" >&2
    exit 2
  fi
  echo "gpu check: installing $missing from $WHEELS"
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" $missing
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m benchmarks.gpu_check "$@"
