# `make run` and `make test` each create .venv, install the pinned set, and do their job.
# Re-installation happens only when pyproject.toml or constraints.txt changed since the last install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= cnncodes-out

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test test-fast test-all install install-gpu bench clean

install: $(STAMP)

# The GPU build of TensorFlow (CUDA libraries from the package index): for benchmarks/gpu.sh and GPU machines.
GPU_STAMP := $(VENV)/.installed-gpu
install-gpu: $(GPU_STAMP)

$(GPU_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[tensorflow,dev,gpu]" \
		--config-settings editable_mode=compat
	@touch $@

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	# editable_mode=compat puts the checkout on sys.path: a Dask worker puts its own folder, which holds
	# a "storage" spill directory, first on sys.path, and a path-less editable finder would lose to it.
	# every Keras backend, TensorFlow the default: the tests compare them (torch is the CPU build, 2.13.0)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[tensorflow,jax,torch,dev]" \
		--config-settings editable_mode=compat
	@touch $(STAMP)

# On developer machines ../shared/keras holds ImageNet weights in Keras's cache layout: use them offline.
SHARED_KERAS := $(wildcard $(abspath ../shared/keras))

run: $(STAMP)
	$(if $(SHARED_KERAS),KERAS_HOME=$${KERAS_HOME:-$(SHARED_KERAS)}) $(BIN)/cnncodes demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the edit-test loop: every test not marked slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
