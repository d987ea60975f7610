# The README's commands. `make pretrain` and `make test` each do all the set-up they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The versions this project is tested with (CPU machines take them from the local wheel cache).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: install data pretrain knn probe compare results export test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST from the Debian package when we can install it (root + apt-get); otherwise the
# data module falls back to torchvision's download and says what to do if that fails too.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist || \
		 (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null && \
		echo "Fashion-MNIST installed: $(FMNIST_DIR)"; \
	else \
		echo "Fashion-MNIST package not installable here (needs root and apt-get): the run will try torchvision's download"; \
	fi

pretrain: install data
	$(PY) scripts/pretrain.py +experiment=moco_v2 $(ARGS)

# Evaluation of a checkpoint (or CHECKPOINT=raw / random for the baselines).
CHECKPOINT ?= raw
knn: install data
	$(PY) scripts/knn_eval.py checkpoint=$(CHECKPOINT) $(ARGS)

probe: install data
	$(PY) scripts/linear_probe.py checkpoint=$(CHECKPOINT) $(ARGS)

compare: install data
	$(PY) scripts/compare_optimizers.py checkpoint=$(CHECKPOINT) $(ARGS)

# The README's Results table and figures (hours on a CPU: docs/results.md; re-running continues).
results: install data
	PY=$(PY) scripts/reproduce_results.sh

# The query backbone for plain torchvision: make export CHECKPOINT=runs/.../last.ckpt [ARGS="format=safetensors"]
export: install
	$(PY) scripts/export.py checkpoint=$(CHECKPOINT) $(ARGS)

# Lint first: a style slip fails in seconds, not after the whole suite.
test: lint
	$(PY) -m pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check moco scripts tests
	$(VENV)/bin/ruff format --check moco scripts tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
