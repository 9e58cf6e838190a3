# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test bench clean

setup: $(STAMP)

# torch first, from its CPU wheel, so pip does not pull gigabytes of CUDA packages for it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/iotbed run scenarios/quickstart.yaml

# The report test renders HTML in Debian's Chromium; install it when missing (root, as on CI machines).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium is missing: sudo apt-get install chromium (the report test is skipped without it)"; fi; }

test: setup system-deps
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .cache runs benchmarks/results
