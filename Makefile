# earshot: `make run` serves the demo, `make test` runs the whole suite. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
EARSHOT := $(VENV)/bin/earshot
HOST ?= 127.0.0.1
PORT ?= 8000
FLEET_WORKERS ?= 2
PYTEST_ARGS ?=
LOCK_ARGS ?=
# The locks are for the Python this project runs on (DESIGN: >= 3.11; CI and the Dockerfile: 3.11).
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet $(LOCK_ARGS)

.PHONY: help venv install install-test demo run fleet test lint lock system-deps bench soak stack clean

help:
	@echo "make run    - install earshot and the demo models into $(VENV), serve on $(HOST):$(PORT)"
	@echo "make fleet  - like run, as a fleet on Ray Serve (local Ray on 127.0.0.1, FLEET_WORKERS=$(FLEET_WORKERS) workers)"
	@echo "make test   - install test dependencies, lint, run the whole suite"
	@echo "make lint   - ruff, mypy (strict, src/), import-linter"
	@echo "make bench  - benchmarks (not part of make test), results in bench/results/"
	@echo "make soak   - long soak under an eviction storm (minutes)"
	@echo "make stack  - earshot + Prometheus + Alertmanager on loopback, configured from the repo"
	@echo "make lock   - re-resolve requirements/*.txt from pyproject.toml (LOCK_ARGS=--upgrade: newest)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

# Installs come from the locks in requirements/ (exact versions), then earshot itself without
# resolving anything again. Stamps: reinstall only when a lock or pyproject.toml changes.
$(VENV)/.installed-run: pyproject.toml requirements/run.txt | $(PY)
	$(PIP) install -q -r requirements/run.txt
	$(PIP) install -q --no-deps -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml requirements/test.txt | $(PY)
	$(PIP) install -q -r requirements/test.txt
	$(PIP) install -q --no-deps -e .
	@touch $@ $(VENV)/.installed-run

$(VENV)/.installed-bench: pyproject.toml requirements/bench.txt $(VENV)/.installed-test
	$(PIP) install -q -r requirements/bench.txt
	$(PIP) install -q --no-deps -e .
	@touch $@

lock: | $(PY)
	$(PIP) install -q uv
	$(UV_COMPILE) -o requirements/run.txt
	$(UV_COMPILE) --extra test --extra lint --extra fleet -o requirements/test.txt
	$(UV_COMPILE) --extra test --extra lint --extra fleet --extra bench -o requirements/bench.txt

install: $(VENV)/.installed-run
install-test: $(VENV)/.installed-test

demo: install
	$(EARSHOT) models install-demo

run: demo
	$(EARSHOT) serve --host $(HOST) --port $(PORT)

# The fleet: the run lock plus the fleet extra (Ray Serve), every version as the test lock pins it.
$(VENV)/.installed-fleet: pyproject.toml requirements/run.txt requirements/test.txt $(VENV)/.installed-run
	$(PIP) install -q -r requirements/run.txt -c requirements/test.txt -e ".[fleet]"
	@touch $@

fleet: $(VENV)/.installed-fleet demo
	$(EARSHOT) fleet --host $(HOST) --port $(PORT) --fleet-workers $(FLEET_WORKERS)

system-deps:
	bash scripts/install-system-deps.sh

lint: install-test
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install-test system-deps lint
	$(EARSHOT) models install-demo
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench demo
	$(PY) -m bench $(BENCH_ARGS)

soak: install-test demo
	EARSHOT_SOAK_SECONDS=$${EARSHOT_SOAK_SECONDS:-600} $(VENV)/bin/pytest tests/integration/test_soak.py -p no:cacheprovider -v $(PYTEST_ARGS)

stack: install-test demo system-deps
	$(PY) scripts/stack.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
