# The two set-up commands (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtual environment it needs in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.avssl-installed
CORPUS ?= data/demo
# Head seeds of the proof: one linear probe per seed and backbone, each clip's scores averaged over
# them before the verdict (`make demo PROOF_SEEDS=0` is one seed, about 20 minutes quicker).
PROOF_SEEDS ?= 0 1 2

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

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
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) data runs mlruns mlflow.db .pytest_cache
