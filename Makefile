# Everything runs inside a virtual environment this Makefile creates, pinned by requirements.lock.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup test repro bench lock clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml packages/gal_core/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c requirements.lock -r requirements.txt
	touch $@

test: setup
	$(BIN)/python -m pytest

repro: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

bench: setup
	$(BIN)/python -m benchmarks.gal_overhead

# Re-resolve every dependency from scratch and pin the result (run after changing a pyproject).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip --disable-pip-version-check install -r requirements.txt
	.lock-venv/bin/python -m pip freeze --exclude-editable > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv
