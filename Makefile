# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

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

test: setup
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .cache runs benchmarks/results
