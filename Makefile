# Two entry points: `make run` (install + full pipeline on Fashion-MNIST) and `make test` (every
# test tier); `make check` runs the unit tier, the edit loop.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
LOCK := requirements.lock
FASHION_DIR := /usr/share/datasets/fashion-mnist
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test check install dataset lint ui clean lock gpu-check

run: install dataset
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory web; else \
		echo "note: no npm here: dvc plots pages will load vega from its CDN"; fi
	dvc repro

# pytest-xdist workers; each test module runs whole on one (tests/conftest.py's scopes). Most of
# the end-to-end time is subprocesses and servers, so more workers than cores still pays.
TEST_WORKERS ?= 4

test: install web
	pytest -n $(TEST_WORKERS) --dist loadscope

check: install
	pytest -n 2 --dist loadscope tests/unit

install: $(VENV)/.installed

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build. Then every
# other package at the exact version of requirements.lock (made on x86-64 Linux, where CI runs;
# elsewhere pyproject's ranges, with a note), then the project itself.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	@if [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ]; then \
		$(BIN)/pip install --quiet -r $(LOCK); \
	else \
		echo "note: $(LOCK) pins x86-64 Linux; installing from pyproject's ranges instead"; \
	fi
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# Refresh requirements.lock: a fresh virtualenv with the pinned torch and `.[dev]` at the newest
# versions pyproject allows, frozen (torch, pinned above, and the project itself left out).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet $(TORCH)
	.lock-venv/bin/pip install --quiet ".[dev]"
	{ echo "# The whole Python environment of vaepipe, exact versions (x86-64 Linux, Python $$(.lock-venv/bin/python -c 'import sys; print(*sys.version_info[:2], sep=".")')),"; \
	  echo "# made by \`make lock\` on $$(date -u +%Y-%m-%d); \`make install\` and CI install from it."; \
	  echo "# torch is installed first and pinned by the Makefile ($(TORCH))."; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|vaepipe)( |=|@)'; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

# Debian's dataset-fashion-mnist where apt-get is usable; otherwise the prepare stage downloads
# the IDX files into data/raw (SHA-256 checked).
dataset:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || \
		 (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
		&& echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist"; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -q >/dev/null && sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST: not installed system-wide; the prepare stage will download it"; \
	fi

lint: install
	ruff check . && ruff format --check .

ui: install
	$(BIN)/python scripts/mlflow_ui.py

clean:
	rm -rf data/prepared models metrics plots dvc.lock

# The whole GPU path (CUDA training, dvc repro on CUDA, ORT CUDA/TensorRT vs torch, the served
# decoder on the GPU) in under 10 minutes, on a machine with an NVIDIA GPU.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out gpu-check.md

# onnxruntime-web for `vaepipe site` and vega for `dvc plots show` (.dvc/plots.html), pinned by
# web/package-lock.json; reinstalled when the lock is newer than the install. No install
# scripts: the site and the plots page only read files from the packages' dist/ and build/.
.PHONY: web
web: web/node_modules/.package-lock.json

web/node_modules/.package-lock.json: web/package-lock.json web/package.json
	npm ci --prefix web --ignore-scripts --no-audit --no-fund
	touch $@

# The team stack on this machine (scripts/team.py): PostgreSQL, an S3 store (SeaweedFS) and an
# MLflow server on 127.0.0.1, kept in .team/; `up` prints MLFLOW_TRACKING_URI and the DVC remote.
.PHONY: team-up team-down
team-up: install
	$(BIN)/python scripts/team.py up

team-down:
	$(PYTHON) scripts/team.py down
