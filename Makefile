# Set-up and the two jobs of the README. Idempotent: the venv is made and filled once, then reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test browser

setup: $(STAMP)

# torch/torchvision are pinned here (their wheels lie on the CI machine's disk); the library accepts a range.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) infer.py demo=true output_dir=out/demo

test: setup
	$(PY) -m pytest -q
