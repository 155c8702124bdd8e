# Two commands do everything on a fresh machine (Python 3.11-3.13 as python3), from any shell:
#   make pipeline   create .venv with the locked versions, then run the whole DVC pipeline
#   make test       create .venv with the locked versions, then run the test suite
# Offline, or with your own copy of the archive:
#   make pipeline FETCH_URL=/path/to/cifar-10-binary.tar.gz FETCH_MD5=<its md5>
# The usual commands afterwards, without activating the environment:
#   make recipe NAME=recipe-sgd    run a training recipe of recipes/ as a DVC experiment
#   make reproduce MODEL=models:/alexnet8-cifar10/3   rebuild a version from its record: the same?
#   make ui                        browse the runs in MLflow (the URL it prints)
#   make train-workers WORKERS=2   the train stage as 2 workers on this machine (docs/scaling.md)
#   make train-ray WORKERS=2       the train stage as 2 Ray Train workers, on RAY_ADDRESS's cluster or a local one
#   make stack-up / stack-down     the team stack: PostgreSQL, an S3 store and an MLflow server (docs/team.md)
#   make clean                     remove what `make pipeline` makes again (README, "Clean up")

PYTHON ?= python3
VENV := .venv

# Every command below runs inside the project's environment, exactly as after
# `source .venv/bin/activate`: dvc.yaml's stage commands (`python -m alexnet8...`), DVC's queue
# workers and `mlflow run` then find the project's interpreter whatever the calling shell has on
# PATH. The interpreter that creates the environment is looked up on the caller's PATH.
HOST_PATH := $(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
unexport PYTHONHOME

.PHONY: setup pipeline test recipe reproduce train-workers train-ray ui stack-up stack-down stack-status lint format lock clean clean-env

# The offline page template for `dvc plots show` (it writes nothing when it is in place).
setup: $(VENV)/.installed
	@python tools/offline_plots.py

# Exact versions and hashes from requirements.lock (regenerate with `make lock`); the project
# itself is installed editable on top, without touching the locked set. The stamp file is
# written last, so an interrupted install is completed by the next make.
$(VENV)/.installed: requirements.lock pyproject.toml
	@PATH='$(HOST_PATH)' $(PYTHON) -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else "$(PYTHON) is Python %d.%d; this project needs 3.11-3.13 (make PYTHON=python3.12 ...)" % sys.version_info[:2])'
	@echo "creating $(VENV) with $$(PATH='$(HOST_PATH)' command -v $(PYTHON))"
	@PATH='$(HOST_PATH)' $(PYTHON) -m venv $(VENV)
	python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

pipeline: setup
ifdef FETCH_URL
	dvc exp run -S 'fetch.url=$(FETCH_URL)' -S 'fetch.md5=$(FETCH_MD5)'
else
	dvc repro
endif

# One test process per core (pytest-xdist); each test file runs whole in one of them, so the
# module-wide fixtures (a trained model, a team stack) are made once. PYTEST_ARGS adds options.
# The tests marked `ray` need the Ray extra.
test: setup $(VENV)/.installed-ray
	python -m pytest --numprocesses auto --dist loadfile $(PYTEST_ARGS)

# `make recipe NAME=recipe-sgd [EXP=name] [SET="seed=7 train.epochs=1"]`: `dvc exp run -n EXP -S ...`
# with the params of recipes/NAME.yaml (and SET on top), on the committed params.yaml.
recipe: setup
	python -m alexnet8.recipe $(NAME) $(if $(EXP),--name $(EXP)) $(foreach item,$(SET),--set $(item))

# `make reproduce MODEL=models:/alexnet8-cifar10/3` (or models:/alexnet8-cifar10@champion, or a run id)
# [WORKSPACE=folder]: rebuild the model in a git worktree at its run's commit, with its params and data,
# and say whether it came out bit for bit the same (docs/experiments.md). This checkout is not touched.
reproduce: setup
	python -m alexnet8.reproduce '$(MODEL)' $(if $(WORKSPACE),--workspace '$(WORKSPACE)')

# dvc.yaml's train command as WORKERS processes of one MultiWorkerMirroredStrategy training on
# 127.0.0.1; `dvc commit -f train` then records its outputs (docs/scaling.md).
WORKERS ?= 2
train-workers: setup
	python -m alexnet8.launch_workers --workers $(WORKERS)

# The optional Ray extra (`make train-ray`, the tests marked `ray`): exact versions and hashes from
# requirements-ray.lock, locked against requirements.lock (`make lock`), installed on top of it.
$(VENV)/.installed-ray: requirements-ray.lock $(VENV)/.installed
	python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements-ray.lock
	touch $@

# dvc.yaml's train command as WORKERS Ray Train workers on the cluster at RAY_ADDRESS, or on a local
# one started and stopped here; rank 0's outputs come back here and `dvc commit -f train` records
# them. [STORAGE=path]: Ray's storage path, the same shared path on every node (docs/scaling.md).
train-ray: setup $(VENV)/.installed-ray
	python -m alexnet8.ray_training --workers $(WORKERS) $(if $(STORAGE),--storage-path '$(STORAGE)')

# MLflow 3's UI opens in its GenAI view: the address printed opens the runs table in model-training
# mode with the project's columns (alexnet8.tracking.runs_page_url).
ui: setup
	@python -m alexnet8.tracking --ui-url http://127.0.0.1:5000
	mlflow ui --host 127.0.0.1 --port 5000

# The team stack on 127.0.0.1 (docs/team.md): PostgreSQL, a SeaweedFS S3 store and an MLflow server
# with basic auth, state in .stack/. `up` is idempotent and writes .stack/env for clients.
stack-up: setup
	python stack/stack.py up

stack-down: setup
	python stack/stack.py down

stack-status: setup
	python stack/stack.py status

lint: setup
	ruff check .
	ruff format --check .

format: setup
	ruff format .
	ruff check --fix .

# Re-resolve the pinned versions after editing the ranges in pyproject.toml.
lock: setup
	python -m pip install --quiet uv
	uv pip compile pyproject.toml --extra dev --generate-hashes --universal --python-version 3.11 -o requirements.lock
	echo 'ray[default,train]>=2.60,<3' | uv pip compile - -c requirements.lock --generate-hashes --universal \
		--python-version 3.11 -o requirements-ray.lock

# What the next `make pipeline` makes again: the prepared splits, the model, the reports, an
# interrupted training's state and `dvc plots` pages. Kept: the environment (`make clean-env`), the
# downloaded archive (data/raw/), the record of the runs (mlflow.db, mlruns/), DVC's cache and
# experiments (`dvc exp remove`, `dvc gc`) and the team stack's state (.stack/).
clean:
	rm -rf data/prepared models/model.keras models/mlflow_run.json models/served_model.json reports checkpoints \
		dvc_plots

clean-env:
	rm -rf $(VENV)
