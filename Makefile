# One command for the main job, one for the tests; each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: repro test lint bench retrain ui server server-user remote install clean-venv

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
# A named recipe (recipes/<name>.yaml, `python -m resnet.recipes` lists them) runs as a DVC
# experiment with its params: make repro RECIPE=cpu-resnet20 [DATA_SOURCE=...]
# SET="key=value ..." adds values over the recipe's (a weights file: tutorial-finetune).
DATA_ARGS = $(if $(DATA_SOURCE),-S data.dataset=$(DATASET) -S data.source=$(DATA_SOURCE))
repro: $(STAMP)
ifdef RECIPE
	export PATH="$(CURDIR)/$(BIN):$$PATH" && args="$$(python -m resnet.recipes $(RECIPE) $(SET))" && \
	  eval "dvc exp run $$args $(DATA_ARGS) $(DVC_ARGS)"
else ifdef DATA_SOURCE
	$(RUN) $(BIN)/dvc exp run $(DATA_ARGS) $(DVC_ARGS)
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

# The team's tracking server (docs/team.md): mlflow server on a PostgreSQL of its own (needs
# PostgreSQL's programs: apt-get install postgresql), basic auth, artifacts proxied; state in
# team-server/. For the team: make server SERVER_ARGS="--host 0.0.0.0 --allowed-hosts mlflow.example.com"
server: $(STAMP)
	$(RUN) $(BIN)/python -m resnet.teamserver serve $(SERVER_ARGS)

# A member's login on it: make server-user NAME=alice (asks for the password, 12 characters or more).
server-user: $(STAMP)
	@test -n "$(NAME)" || { echo "usage: make server-user NAME=<user> [SERVER_URL=http://host:5000]" >&2; exit 2; }
	$(RUN) $(BIN)/python -m resnet.teamserver add-user $(NAME) $(if $(SERVER_URL),--url $(SERVER_URL))

# The team's DVC remote (docs/team-remote.md), one command:
#   make remote URL=s3://bucket/resnet | ssh://user@host/srv/resnet-dvc | /mnt/shared/resnet-dvc
# Written to .dvc/config (commit it); LOCAL=1 writes the git-ignored .dvc/config.local
# instead (what CI does). For s3://, ssh://, gs:// and azure:// it first installs DVC's
# plugin for that storage into the venv (dvc[s3] etc., same DVC version). Credentials go to
# .dvc/config.local (dvc remote modify --local team ...), never to .dvc/config.
# Then: dvc push --run-cache sends data, models and run-cache; dvc pull fetches them.
remote: $(STAMP)
	@test -n "$(URL)" || { echo "usage: make remote URL=<s3://bucket/path | ssh://host/path | /shared/dir> [LOCAL=1]" >&2; exit 2; }
	@case '$(URL)' in s3://*) extra=s3 ;; ssh://*) extra=ssh ;; gs://*) extra=gs ;; azure://*) extra=azure ;; *) extra= ;; esac; \
	if [ -n "$$extra" ] && ! $(BIN)/python -c "import dvc_$$extra" 2>/dev/null; then \
	  version=$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('dvc'))") && \
	  echo "installing dvc[$$extra]==$$version" && \
	  $(BIN)/python -m pip install --quiet --progress-bar off -c constraints.txt "dvc[$$extra]==$$version"; \
	fi
	$(BIN)/dvc remote add $(if $(LOCAL),--local )--default --force team '$(URL)'
	$(BIN)/dvc remote list

clean-venv:
	rm -rf $(VENV)
