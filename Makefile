# `make demo` and `make test` create .venv and install on first use: torch pinned first, its CPU build
# from PyTorch's CPU index (PyPI's Linux wheel pulls GBs of CUDA libraries); only torch itself comes from
# there (--no-deps), so an unreachable index costs one lookup, not one per dependency; then torch's
# dependencies from pip's own index (which also supplies torch itself when the CPU index had none).
# Then this project, every dependency pinned by requirements.lock (`make lock` rewrites it).
PYTHON ?= python3
TORCH  ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= runs/demo
DEMO_STEPS ?= 20

.PHONY: install demo test lint bench clean lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	-$(BIN)/python -m pip install --quiet --retries 1 --no-deps --index-url $(TORCH_INDEX) $(TORCH)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the exact versions of a .venv whose tests pass; torch without its build tag (+cpu, +cu128), so the
# lock holds for any build of that version
lock:
	{ echo "# pip constraints: the versions \`make test\` last passed with (written by \`make lock\`)"; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > requirements.lock

# the whole chain on the bundled sample photos with the tiny profile: prepare -> a short training
# (the last shard held out) -> upscale the held-out LR images with the export -> evaluate against their HR
demo: $(STAMP)
	$(BIN)/python -m pipeline.prepare --output $(DEMO)
	$(BIN)/python -m training.launch --input $(DEMO) --output $(DEMO)/train \
		--set train.max_steps=$(DEMO_STEPS) --set train.val_shards=1 --set train.checkpoint_every=$(DEMO_STEPS)
	$(BIN)/python -m pipeline.pairs_export --input $(DEMO) --output $(DEMO)/heldout --last 1
	$(BIN)/python -m pipeline.upscale --input $(DEMO)/heldout/lr --output $(DEMO)/upscaled \
		--model $(DEMO)/train/export --set upscale.steps=10 --set upscale.tile_size=16 --set upscale.tile_overlap=4
	$(BIN)/python -m pipeline.evaluate --input $(DEMO)/upscaled --reference $(DEMO)/heldout/hr \
		--lr $(DEMO)/heldout/lr --output $(DEMO)/report
	@echo "demo: shards $(DEMO)/shards, model $(DEMO)/train/export, upscaled $(DEMO)/upscaled"
	@echo "demo report: $(DEMO)/report/index.html (metrics: $(DEMO)/report/metrics.json)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/degrade.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/annotate.py
	$(BIN)/python benchmarks/upscale.py --sizes 256 512 1024

clean:
	rm -rf runs .cache .pytest_cache
