# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this disk; real users get torch from the package's normal range.
TORCH_PIN ?= torch==2.13.0
export AQ_USE_JIT ?= 0

.PHONY: install demo test lint typecheck unit bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/quickstart.py
	$(PY) examples/minilm_demo.py

lint: install
	$(VENV)/bin/ruff check aqlm_ctx tests examples benchmarks
	$(VENV)/bin/ruff format --check aqlm_ctx tests examples benchmarks

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q -p no:cacheprovider

test: lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
