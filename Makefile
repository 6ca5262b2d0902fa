# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Exact pins live here only; pyproject.toml keeps ranges (the GPU machines carry other torch builds).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m fastreg.train

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q
