# make demo       the whole recipe offline on SmolLM2-135M-Instruct (installs first)
# make demo-tiny  the same chain on a tiny model built from scratch (what CI runs)
# make test       the default test suite (installs first)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RLHFKIT := $(VENV)/bin/rlhfkit
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow lint help

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

help: install
	$(RLHFKIT) --help

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check src tests
