# Two commands on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run demo serve test test-fast bench clean
RUN_DIR ?= runs/demo

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Until the service lands, `make run` is the CLI demo.
run: demo

# The CLI demo: fine-tune the bundled MiniLM on 2,000 SST-2 rows shipped in the repo, then evaluate it.
demo: install
	$(BIN)/finetune-serve train --train examples/sst2_sample/train.jsonl \
		--validation examples/sst2_sample/validation.jsonl --epochs 1 --output $(RUN_DIR)
	$(BIN)/finetune-serve evaluate --model $(RUN_DIR)/model --data examples/sst2_sample/validation.jsonl

# The REST service (API + trainer) on localhost:$(PORT); jobs and models live in FINETUNE_SERVE_HOME.
PORT ?= 3000
serve: install
	$(BIN)/bentoml serve service.bento:FinetuneServe --host 127.0.0.1 --port $(PORT)

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
