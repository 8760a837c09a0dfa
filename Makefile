# Set-up and the two everyday commands. `make repro` and `make test` create
# .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install; on a CUDA machine e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: setup repro test test-fast ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@command -v dot >/dev/null || echo "note: Graphviz 'dot' not found: model graphs fall back to a simple chart (apt-get install graphviz)"
	touch $@

setup: $(VENV)/.installed

repro: setup  ## run the pipeline (dvc repro) on the default experiment
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

# Test files run in parallel (pytest-xdist), each file in one worker so that its shared fixtures run once.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: setup  ## the whole test suite, end-to-end tests included
	PATH="$(abspath $(BIN)):$$PATH" $(PYTEST)

test-fast: setup  ## the suite without the slow end-to-end tests
	PATH="$(abspath $(BIN)):$$PATH" $(PYTEST) -m "not slow"

# The project's store (an exported MLFLOW_TRACKING_URI wins, as it does for runs), whatever the cwd of make.
ui: setup  ## the MLflow UI on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
		--default-artifact-root "$(CURDIR)/mlruns" --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs data/prepared weights models
