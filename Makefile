# One entry point for people and CI. `make install` then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install test test-fast lint format emulator check demo dev

install:  ## a local virtual environment with everything (runtime, emulator, tests, checks)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(MAKE) install

demo: $(VENV)/.installed  ## one job end to end on the emulator, a local S3 and Redis (DEMO_MODEL=wan2.2-animate-move: on Wan)
	DEMO_MODEL=$(DEMO_MODEL) $(PY) -m devstack.demo

dev: $(VENV)/.installed  ## the full local stack in one command (Procfile.dev, .env.dev): Redis, S3, emulator, worker, beat, Flower, exporter
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/honcho -e .env.dev -f Procfile.dev start

test: $(VENV)/.installed  ## the whole test suite (Redis at $$REDIS_URL if it answers, else the suite starts its own)
	$(PY) -m pytest -n 6 --dist loadfile --no-loadscope-reorder

test-fast: $(VENV)/.installed  ## the edit loop: unit tests, the layer rule and the contract suites (under a minute)
	$(PY) -m pytest -n 4 tests/unit tests/deploy tests/integration/test_*_contract.py

lint:  ## ruff lint + format check, strict mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

check: lint test

emulator:  ## the DashScope emulator in the foreground on :8765
	$(PY) -m emulator --port 8765
