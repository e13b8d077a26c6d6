# `make demo` and `make test` create .venv and install on first use: torch pinned first (the CPU
# wheel; an unpinned torch would pull GBs of CUDA wheels), then this project with its extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= runs/demo

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,s3]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipeline.prepare --output $(DEMO)
	@echo "demo results: $(DEMO)/shards (WebDataset shards), $(DEMO)/summary.json"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/degrade.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/annotate.py

clean:
	rm -rf runs .cache .pytest_cache
