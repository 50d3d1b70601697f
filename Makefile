# The two set-up commands (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtual environment it needs in .venv on first use.
PYTHON ?= python3
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.avssl-installed
CORPUS ?= data/demo
# Head seeds of the proof: one linear probe per seed and backbone, each clip's scores averaged over
# them before the verdict (`make demo PROOF_SEEDS=0` is one seed, about 20 minutes quicker).
PROOF_SEEDS ?= 0 1 2

LOCK := requirements.lock
# The platform the lock is resolved for (CI's and the development machines').
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28
LATEST_VENV ?= .venv-latest

.PHONY: demo test test-fast test-latest install lock clean

# Exactly the versions in requirements.lock, verified by hash, nothing resolved at install time;
# then avssl itself, editable, with the locked build backend.
install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $(STAMP)

# Re-resolve pyproject.toml's ranges to their newest versions and write them, with hashes, to the
# lock. Commit the lock only after `make test` passes with it.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_TARGET) --generate-hashes --upgrade --no-header --quiet -o $(LOCK)

# The newest versions pyproject.toml allows, in a scratch venv, against the fast tests: an upstream
# release that breaks avssl shows here before a user installs it. Does not touch the lock or .venv.
test-latest: $(STAMP)
	rm -rf $(LATEST_VENV)
	$(BIN)/uv venv --quiet --python $(BIN)/python $(LATEST_VENV)
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_TARGET) --upgrade --no-header --quiet -o $(LATEST_VENV)/requirements.txt
	VIRTUAL_ENV=$(LATEST_VENV) $(BIN)/uv pip install --quiet -r $(LATEST_VENV)/requirements.txt
	VIRTUAL_ENV=$(LATEST_VENV) $(BIN)/uv pip install --quiet --no-deps -e .
	@diff <(grep -E '^[A-Za-z0-9_.-]+==' $(LOCK) | sed 's/ .*//') <(grep -E '^[A-Za-z0-9_.-]+==' $(LATEST_VENV)/requirements.txt | sed 's/ .*//') \
		&& echo "test-latest: the lock is already at the newest allowed versions" || true
	$(LATEST_VENV)/bin/python -m pytest -m "not slow" -q

# The main job on the embedded default: synthetic corpus -> pretraining on a local Ray instance
# (2 DeepSpeed workers on CPU/gloo) -> released checkpoint in runs/demo/avssl/release, tracked
# in MLflow (runs/mlflow.db) -> linear-probe finetuning of the three heads from the pretrained
# and from a random backbone, three head seeds pooled, evaluated per modality (the proof table).
# Re-running resumes.
demo: $(STAMP)
	@test -f $(CORPUS)/index.json || $(BIN)/avssl data synth --config configs/data/demo.yaml --out $(CORPUS)
	$(BIN)/avssl data inspect $(CORPUS)
	$(BIN)/avssl pretrain --config configs/pretrain/demo.yaml
	$(BIN)/avssl prove --pretrained runs/demo/avssl/release --data $(CORPUS) --steps 100 --set head.freeze_backbone=true --set optim.base_lr=0.02 --seeds $(PROOF_SEEDS)

test: $(STAMP)
	$(BIN)/python -m pytest --durations=15

# Without Ray, DeepSpeed or servers.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" --durations=10

clean:
	rm -rf $(VENV) $(LATEST_VENV) data runs mlruns mlflow.db .pytest_cache
