# The few commands a newcomer needs. `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Test processes use one OpenMP thread each and do not spin-wait (2-core machines).
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo costs test test-fast lint format docs clean

# The tests cover every extra, the phone formats (mobile: ExecuTorch; litert) included;
# docs builds the site.
EXTRAS ?= all,dev,mobile,litert,docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

# Trains mobilenet_v3_small on the built-in MNIST digits (4,000 train / 1,000 held out),
# evaluates the best weights and prints where the curves are. About 3 minutes on 2 cores.
DEMO_OUT ?= runs/demo
demo: setup
	rm -rf $(DEMO_OUT)
	OMP_NUM_THREADS=2 $(BIN)/mobilenet train --data mnist --model mobilenet_v3_small \
		--recipe demo --workers 0 --out $(DEMO_OUT)
	OMP_NUM_THREADS=2 $(BIN)/mobilenet eval --weights $(DEMO_OUT)/best.safetensors --data mnist

costs: setup
	$(BIN)/mobilenet cost --all

test: setup lint
	$(BIN)/python -m pytest -n 2 --durations=10

# The same without the end-to-end runs of whole commands (marked slow): a quicker check.
test-fast: setup lint
	$(BIN)/python -m pytest -n 2 -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks conftest.py docs/hooks.py
	$(BIN)/ruff format --check src tests benchmarks conftest.py docs/hooks.py

format: setup
	$(BIN)/ruff format src tests benchmarks conftest.py docs/hooks.py
	$(BIN)/ruff check --fix src tests benchmarks conftest.py docs/hooks.py

# The documentation site (mkdocs.yml, docs/) into site/; --strict: any warning fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf site $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
