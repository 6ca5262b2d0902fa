# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Exact pins live here only; pyproject.toml keeps ranges (the GPU machines carry other torch builds).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1
TORCH_PINS := $(TORCH_PIN) torchvision==0.29.1

.PHONY: demo test lint install light-install

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

# The kernels alone, as the README installs them: in a fresh venv of torch, `pip install .` adds fastreg-distill
# and nothing else, pip check is clean, and the README's drop-in snippet runs (tests/check_light_install.py).
light-install: install
	$(PY) tests/check_light_install.py build/light-venv $(TORCH_PIN)

test: lint light-install
	$(PY) -m pytest -q
