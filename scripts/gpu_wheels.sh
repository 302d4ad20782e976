#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on a GPU machine that has no network (its image holds torch,
# transformers, accelerate, peft, pyarrow and pyyaml, not these), in the versions this checkout's environment runs.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION] [DEST]     # default 3.12 (the GPU machines' Python), .gpu-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${1:-3.12}
DEST=${2:-.gpu-wheels}
PYTHON=${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi)}
pins=$("$PYTHON" -c "
import importlib.metadata as m
names = ['pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'datasets', 'dill', 'multiprocess']
print(' '.join(f'{n}=={m.version(n)}' for n in names))")
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any $pins
ls "$DEST"
