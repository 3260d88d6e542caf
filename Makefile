# One command for the main job, one for the tests; each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: repro test lint bench retrain ui install clean-venv

# The venv is rebuilt when the dependency list or the torch pin changes.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Main job: the whole DVC pipeline. Extra dvc flags: make repro DVC_ARGS="-f".
# Offline: make repro DATA_SOURCE=path/to/archive [DATASET=imagefolder|cifar10|cifar100]
# runs it as a DVC experiment with the data parameters set (params.yaml is updated).
DATASET ?= imagefolder
# Stage commands say `python`: put the venv first on PATH so DVC runs ours.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"
repro: $(STAMP)
ifdef DATA_SOURCE
	$(RUN) $(BIN)/dvc exp run -S data.dataset=$(DATASET) -S data.source=$(DATA_SOURCE) $(DVC_ARGS)
else
	$(RUN) $(BIN)/dvc repro $(DVC_ARGS)
endif

# Lint and format check (ruff, configured in pyproject.toml), then the tests, all of them
# (CI runs this). Quick ones only: make test PYTEST_ARGS="-m 'not slow'"
test: lint
	$(RUN) $(BIN)/python -m pytest $(PYTEST_ARGS)

# Fix what ruff can: ruff check --fix . && ruff format .
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# CPU benchmarks, side by side with the tutorials' way (needs data/prepared: run the
# pipeline's split stage first). Results go to benchmarks/results/.
bench: $(STAMP)
	$(RUN) $(BIN)/python benchmarks/bench_loader.py
	$(RUN) $(BIN)/python benchmarks/bench_train.py

# What CI does on a parameter change: rerun the stale stages, report changed params and
# old vs new metrics against BASE (docs/experiments.md).
# make retrain BASE=main RETRAIN_ARGS="-S train.lr=0.05 --report report.md"
BASE ?= main
retrain: $(STAMP)
	$(RUN) $(BIN)/python -m resnet.retrain --base $(BASE) $(RETRAIN_ARGS)

# The MLflow UI on the pipeline's store, printing the links to its training runs and the
# compare view of the latest two (MLflow 3 otherwise opens on its GenAI overview).
UI_PORT ?= 5000
ui: $(STAMP)
	$(RUN) $(BIN)/python -m resnet.tracking.ui --port $(UI_PORT)

clean-venv:
	rm -rf $(VENV)
