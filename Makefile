# Two commands do everything on a fresh machine (Python 3.11-3.13 as python3):
#   make pipeline   create .venv with the locked versions, then run the whole DVC pipeline
#   make test       create .venv with the locked versions, then run the test suite
# Offline, or with your own copy of the archive:
#   make pipeline FETCH_URL=/path/to/cifar-10-binary.tar.gz FETCH_MD5=<its md5>

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup pipeline test lock clean-env

setup: $(VENV)/.installed

# Exact versions and hashes from requirements.lock (regenerate with `make lock`); the project
# itself is installed editable on top, without touching the locked set.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

pipeline: setup
ifdef FETCH_URL
	$(BIN)/dvc exp run -S 'fetch.url=$(FETCH_URL)' -S 'fetch.md5=$(FETCH_MD5)'
else
	$(BIN)/dvc repro
endif

test: setup
	$(BIN)/python -m pytest

# Re-resolve the pinned versions after editing the ranges in pyproject.toml.
lock: setup
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --universal --python-version 3.11 -o requirements.lock

clean-env:
	rm -rf $(VENV)
