# Two commands on a fresh clone: `make run` (the REST service) and `make test`; `make demo` is the CLI demo.
# `make quality DATA_DIR=...` adds the quality bars: the defaults on real data, some too big for the repo.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run demo serve bento test test-fast test-cluster quality bench clean run-api run-trainer capacity
RUN_DIR ?= runs/demo
# BentoML's usage tracking off unless set: the service and its build need no network.
export BENTOML_DO_NOT_TRACK ?= true

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The CLI demo: fine-tune the bundled MiniLM on 2,000 SST-2 rows shipped in the repo, then evaluate it.
demo: install
	$(BIN)/finetune-serve train --train examples/sst2_sample/train.jsonl \
		--validation examples/sst2_sample/validation.jsonl --epochs 1 --output $(RUN_DIR)
	$(BIN)/finetune-serve evaluate --model $(RUN_DIR)/model --data examples/sst2_sample/validation.jsonl

# The REST service (API + trainer) on localhost:$(PORT) with embedded defaults: SQLite job store and
# model registry under FINETUNE_SERVE_HOME (default ./.finetune-serve), the bundled MiniLM as base model.
# `serve` is the same target under its older name.
PORT ?= 3000
run serve: install
	$(BIN)/bentoml serve service.bento:FinetuneServe --host 127.0.0.1 --port $(PORT)

# The same service as separate processes, as Kubernetes runs it (README: Running as several processes): the
# API alone, and a trainer alone that polls the job store. Both need the same FINETUNE_SERVE_HOME and, for more
# than one machine, FINETUNE_SERVE_DATABASE_URL; run each in its own terminal.
TRAINER_PORT ?= 3001
run-api: install
	$(BIN)/bentoml serve service.bento:Api --host 127.0.0.1 --port $(PORT)

run-trainer: install
	$(BIN)/bentoml serve service.bento:Trainer --host 127.0.0.1 --port $(TRAINER_PORT)

# Capacity on this machine: /predict with 1 and 2 API processes, jobs with 1 and 2 trainers (README: Capacity).
capacity: install
	test -d $(RUN_DIR)/model || $(MAKE) demo RUN_DIR=$(RUN_DIR)
	$(BIN)/python bench/capacity.py --run $(RUN_DIR)

# The packaged service: a Bento in BENTOML_HOME (default ~/bentoml), built offline from bentofile.yaml.
bento: install
	$(BIN)/bentoml build .

# Everything a clone needs is in it (tests/assets); tests/quality runs under `make quality`.
test: install
	$(BIN)/python -m pytest -q -ra --ignore=tests/quality -m "not cluster"

# The deployment as Kubernetes runs it, on one machine: two API and two trainer servers on a throwaway
# PostgreSQL, 51 jobs (about 6 minutes on 2 cores, so apart from make test; .ci/run runs both).
test-cluster: install
	$(BIN)/python -m pytest -q -ra -m cluster tests/test_cluster.py

test-fast: install
	$(BIN)/python -m pytest -q -ra --ignore=tests/quality -m "not slow and not process"

# The quality bars: the defaults, with no hyperparameter given, on SST-2 and small images (data in the repo,
# minutes of training each) and on hymenoptera (398 photos, 46 MB, too big for the repo): DATA_DIR is the
# folder holding hymenoptera/, e.g. `make quality DATA_DIR=../shared/data`. Without it this fails, never skips.
DATA_DIR ?=
quality: install
	@test -n "$(DATA_DIR)" || { echo "make quality: name the data folder, e.g. make quality DATA_DIR=../shared/data" >&2; exit 2; }
	@test -d "$(DATA_DIR)/hymenoptera/train" -a -d "$(DATA_DIR)/hymenoptera/val" || \
		{ echo "make quality: $(DATA_DIR)/hymenoptera/train and val/ not found; DATA_DIR must hold hymenoptera/" >&2; exit 2; }
	FINETUNE_SERVE_QUALITY_DATA="$(abspath $(DATA_DIR))" $(BIN)/python -m pytest -q -ra tests/quality

clean:
	rm -rf $(VENV) runs .pytest_cache
