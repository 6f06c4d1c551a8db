# Everything runs inside a virtual environment this Makefile creates, pinned by requirements.lock.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup test profile repro fanout publish preflight bench ui lock clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml packages/gal_core/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --no-compile -c requirements.lock -r requirements.txt
	@# pip byte-compiles one file at a time (a minute of the install on 2 cores); this uses every core. Like pip,
	@# it skips the few files written in a newer Python's syntax (torch's tests of Python 3.12).
	$(BIN)/python -c "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=2, workers=0)" $(VENV)/lib
	touch $@

# One pytest worker per core (pytest-xdist; JOBS_TEST=0: one process). A test file's tests share one worker and
# its module fixtures, so the end-to-end repro runs once; files go out in collection order, so that repro, the
# longest, starts first.
JOBS_TEST ?= auto
test: setup
	$(BIN)/python -m pytest $(if $(filter 0,$(JOBS_TEST)),,-n $(JOBS_TEST) --dist loadfile --no-loadscope-reorder)

# `make repro PROFILE=regression` (or fanout) switches the profile in params.yaml first, and the grids with it
# (pipelines/profile.py): ablations (paper for `paper`, else smoke), the Table V protocol study (smoke for
# `smoke`, else regression) and Table V's seeds (smoke: 2, else 5).
profile: setup
ifdef PROFILE
	$(BIN)/python -m pipelines.profile $(PROFILE)
endif

# Both run their training commands warm (pipelines/warm.py: one process imports torch and MLflow once and forks
# each run) and DVC with a fast dvc.lock writer (pipelines/dvc_cli.py); a plain `dvc repro` runs the same
# commands cold, to the same results and the same lock.
repro: setup profile
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipelines.warm $(BIN)/python -m pipelines.dvc_cli repro

# The same results with the training stages run JOBS at a time (pipelines/fanout.py): on one multi-GPU node
# each run gets its own GPUs; with GAL_LAUNCHER=slurm each run is a Slurm job. STAGES: DVC targets (default all).
JOBS ?= 4
fanout: setup profile
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipelines.warm $(BIN)/python -m pipelines.fanout --jobs $(JOBS) $(STAGES)

# `make publish PROFILE=regression`: from a clean checkout (else one line, nothing run), `make repro PROFILE=...`
# (VIA=fanout: `make fanout`, with its JOBS and STAGES), params.yaml put back after it, then the report and the run
# records it used copied into results/<profile>/ with stamp.json (pipelines/publish.py, docs/publishing.md).
# `python -m pipelines.audit --published results/<profile> ...` traces its numbers without MLflow.
VIA ?= repro
# (not $(MAKE) in the recipe itself: make would run that line under `make -n` too)
SUBMAKE = $(MAKE)
publish: setup
	$(if $(PROFILE),,$(error name the profile to publish: make publish PROFILE=regression))
	$(BIN)/python -m pipelines.publish $(PROFILE) -- $(SUBMAKE) --no-print-directory $(VIA) PROFILE=$(PROFILE)

# Every training run of a profile at its real size for a few steps, before the GPU-hours are spent
# (pipelines/preflight/): step time, memory, the device-hours each stage will take, and what fails. It plans
# PROFILE from a copy of params.yaml: the workspace is left as it is. STAGES: DVC stages (default all).
DEVICE ?= auto
STEPS ?= 3
WORLD ?= 1
preflight: setup
	$(BIN)/python -m pipelines.preflight --profile $(or $(PROFILE),paper) --device $(DEVICE) --steps $(STEPS) --world $(WORLD) \
		$(if $(BATCH_PER_DEVICE),--batch-per-device $(BATCH_PER_DEVICE)) $(if $(filter 0,$(PRETRAINED)),--random-init) $(STAGES)

bench: setup
	$(BIN)/python -m benchmarks.gal_overhead

# Browse the tracked runs (the default store, mlflow.db at the repo root) at http://127.0.0.1:$(UI_PORT): once the
# server answers it prints each experiment's runs link, which opens MLflow 3 in its Model training view
# (pipelines/ui.py). Ctrl-C stops it.
UI_PORT ?= 5000
ui: setup
	$(BIN)/python -m pipelines.ui --store sqlite:///mlflow.db --port $(UI_PORT)

# Re-resolve every dependency from scratch and pin the result (run after changing a pyproject).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip --disable-pip-version-check install -r requirements.txt
	.lock-venv/bin/python -m pip freeze --exclude-editable > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv
