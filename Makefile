# The two set-up commands (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtual environment it needs in .venv on first use.
PYTHON ?= python3
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.avssl-installed
CORPUS ?= data/demo
QUICK ?= data/quick
# The demo's heads: the recipes of configs/finetune on the quick corpus, 30 steps each.
QUICK_HEAD := --set data.corpus=$(QUICK) --set trainer.storage_path=runs --set trainer.total_steps=30 --set trainer.checkpoint_every=30 --set trainer.log_every=10
# Head seeds of the proof: one linear probe per seed and backbone, each clip's scores averaged over
# them before the verdict (`make proof PROOF_SEEDS=0` is one seed, about 20 minutes quicker).
PROOF_SEEDS ?= 0 1 2

LOCK := requirements.lock
# The platform the lock is resolved for (CI's and the development machines').
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28

.PHONY: demo proof test test-fast test-latest test-lowest install lock clean

# Exactly the versions in requirements.lock, verified by hash, nothing resolved at install time;
# then avssl itself, editable, with the locked build backend. The installer is uv, itself taken
# from the lock by pip with its hashes: the same files, verified the same way, downloaded and
# unpacked in parallel, and compiled to bytecode as pip does (where PYTHONDONTWRITEBYTECODE is set,
# nothing else would: every import would compile from source): 49 s against pip's 103 s for the
# lock (torch with its CUDA libraries) on 2 cores with cold caches.
install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@awk '/^uv==/ {keep = 1; print; next} keep && /^ +--hash/ {print; next} {keep = 0}' $(LOCK) > $(VENV)/uv.lock.txt
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(VENV)/uv.lock.txt
	$(BIN)/uv pip install --python $(BIN)/python --quiet --require-hashes --no-deps --compile-bytecode -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $(STAMP)

# Re-resolve pyproject.toml's ranges to their newest versions and write them, with hashes, to the
# lock. Commit the lock only after `make test` passes with it.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_TARGET) --generate-hashes --upgrade --no-header --quiet -o $(LOCK)

# The bounds of pyproject.toml's ranges, each in a scratch venv (.venv-test-latest,
# .venv-test-lowest) against the fast tests: `test-latest` resolves every package to the newest
# version allowed, so an upstream release that breaks avssl shows here before a user installs it;
# `test-lowest` takes the lowest allowed version of each direct dependency. Neither touches the
# lock or .venv.
test-latest: RESOLUTION := highest
test-lowest: RESOLUTION := lowest-direct
test-latest test-lowest: $(STAMP)
	rm -rf .venv-$@
	$(BIN)/uv venv --seed --quiet --python $(BIN)/python .venv-$@
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_TARGET) --resolution $(RESOLUTION) --no-header --quiet -o .venv-$@/requirements.txt
	VIRTUAL_ENV=.venv-$@ $(BIN)/uv pip install --quiet --compile-bytecode -r .venv-$@/requirements.txt
	VIRTUAL_ENV=.venv-$@ $(BIN)/uv pip install --quiet --no-deps -e .
	@echo "$@: versions that differ from the lock (lock < $@ >):"
	@diff <(grep -E '^[A-Za-z0-9_.-]+==' $(LOCK) | sed 's/ .*//') <(grep -E '^[A-Za-z0-9_.-]+==' .venv-$@/requirements.txt | sed 's/ .*//') || true
	.venv-$@/bin/python -m pytest -m "not slow" -q

# The main job on the embedded default, in minutes on 2 cores: a small synthetic corpus ->
# pretraining on a local Ray instance (2 DeepSpeed workers on CPU/gloo) -> release in
# runs/quick/avssl/release, tracked in MLflow (runs/mlflow.db) -> each head finetuned from it and
# evaluated -> embed and verify on media files. Re-running resumes (a finished run is kept).
demo: $(STAMP)
	@test -f $(QUICK)/index.json || $(BIN)/avssl data synth --config configs/data/quick.yaml --out $(QUICK)
	$(BIN)/avssl data inspect $(QUICK)
	$(BIN)/avssl pretrain --config configs/pretrain/quick.yaml
	@for task in speaker emotion spoof; do \
		$(BIN)/avssl finetune --config configs/finetune/$$task.yaml --init runs/quick $(QUICK_HEAD) \
			--set trainer.name=quick-$$task || exit 1; \
	done
	$(BIN)/avssl data extract $(QUICK) --out runs/quick-clips --speakers 3 --per-speaker 2
	$(BIN)/avssl embed runs/quick-clips/*.flac --checkpoint runs/quick/avssl/release --out runs/quick-clips/embeddings.npy
	$(BIN)/avssl verify runs/quick-clips/spk0008_utt0000.mp4 runs/quick-clips/spk0008_utt0001.mp4 --checkpoint runs/quick-speaker/avssl/release
	$(BIN)/avssl verify runs/quick-clips/spk0008_utt0000.mp4 runs/quick-clips/spk0010_utt0000.mp4 --checkpoint runs/quick-speaker/avssl/release
	$(BIN)/avssl predict --task emotion --checkpoint runs/quick-emotion/avssl/release runs/quick-clips/*.mp4
	@echo "pretrained release: runs/quick/avssl/release; heads: runs/quick-{speaker,emotion,spoof}/avssl/release"
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$$PWD/runs/mlflow.db  (then open http://127.0.0.1:5000)"

# The measurement that pretraining helps (about an hour on 2 cores): the demo corpus, the demo
# recipe's 1200 pretraining steps (release runs/demo/avssl/release), then linear-probe finetuning
# of the three heads from the pretrained and from a random backbone, head seeds pooled, evaluated
# per modality: the proof table.
proof: $(STAMP)
	@test -f $(CORPUS)/index.json || $(BIN)/avssl data synth --config configs/data/demo.yaml --out $(CORPUS)
	$(BIN)/avssl data inspect $(CORPUS)
	$(BIN)/avssl pretrain --config configs/pretrain/demo.yaml
	$(BIN)/avssl prove --pretrained runs/demo/avssl/release --data $(CORPUS) --steps 100 --set head.freeze_backbone=true --set optim.base_lr=0.02 --seeds $(PROOF_SEEDS)

# Every test in one pass on TEST_WORKERS pytest-xdist workers: tests/conftest.py keeps a module's
# tests on one worker (its fixtures are built once) and hands out the longest groups first
# (--no-loadscope-reorder keeps that order), so the end-to-end tests (`slow`: Ray clusters,
# DeepSpeed runs, MLflow and Ray job servers) start early and the quick tests fill the gaps while
# they wait on Ray. More workers than CI's 2 cores only slow every test down (measured: 4 workers
# took longer than 2, and Ray start-ups then ran out of their time limits).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder
test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) --durations=25

# Without Ray, DeepSpeed or servers.
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not slow" --durations=10

clean:
	rm -rf $(VENV) .venv-test-latest .venv-test-lowest data runs mlruns mlflow.db .pytest_cache
