# Two commands on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The CLI demo: fine-tune the bundled MiniLM on a slice of SST-2 shipped in the repo, then evaluate it.
run: install
	$(BIN)/finetune-serve train --train examples/sst2_sample/train.jsonl \
		--validation examples/sst2_sample/validation.jsonl --epochs 1 --output runs/demo
	$(BIN)/finetune-serve evaluate --model runs/demo/model --data examples/sst2_sample/validation.jsonl

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
