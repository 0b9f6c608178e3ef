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

# The web app's browser test needs Debian's chromium; install it where missing (root, as on CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser test will skip"; \
	  else echo "no chromium and no root apt-get: the browser test will skip"; fi; }

test: setup browser
	$(PY) -m pytest -q
