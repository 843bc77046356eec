# Every target installs what it needs: a fresh clone only needs python3 (3.11+) and npm.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
CODEGEN   := .venv-codegen
STAMP     := $(VENV)/.installed
CG_STAMP  := $(CODEGEN)/.installed
BUF       := tools/node_modules/.bin/buf

.PHONY: install up test test-fast lint fmt proto proto-check bench chaos clean envoy-validate

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Codegen runs in its own venv: grpcio-tools 1.76.0 bundles protoc 31.1, whose gencode
# (protobuf 6.31.1) runs on protobuf 6.31+ and 7.x. grpcio-tools itself pins protobuf<7,
# which must not leak into the runtime venv.
$(CG_STAMP): tools/codegen-requirements.txt
	$(PY) -m venv $(CODEGEN)
	$(CODEGEN)/bin/pip install -q -U pip
	$(CODEGEN)/bin/pip install -q -r tools/codegen-requirements.txt
	touch $@

$(BUF): tools/package.json
	cd tools && npm ci --silent --no-audit --no-fund
	touch $@

proto: $(CG_STAMP) $(STAMP)
	PATH=$(CURDIR)/$(CODEGEN)/bin:$$PATH $(CODEGEN)/bin/python tools/gen_protos.py
	$(BIN)/python -m cordum.server.stack.envoy_config --write envoy/envoy.yaml

proto-check: $(CG_STAMP) $(STAMP)
	PATH=$(CURDIR)/$(CODEGEN)/bin:$$PATH $(CODEGEN)/bin/python tools/gen_protos.py --check
	$(BIN)/python -m cordum.server.stack.envoy_config --check envoy/envoy.yaml

envoy-validate: $(STAMP)
	$(BIN)/python -m cordum.server.stack.envoy_config --validate envoy/envoy.yaml

lint: $(STAMP) $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BUF) lint
	$(BUF) format --diff --exit-code --path proto/cordum/v1

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

up: $(STAMP)
	$(BIN)/cordumctl up

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Fault injection against `cordumctl up --replicas 2` (a few minutes; CHAOS_ARGS=--help).
chaos: $(STAMP)
	PYTHONPATH=tests $(BIN)/python -m chaos.run $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) $(CODEGEN) .venv-cap tools/node_modules .pytest_cache
