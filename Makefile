VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup proto proto-check lint typecheck test test-fast demo bench clean

# The venv is up to date when this stamp (written by install-deps.sh, last) is newer than
# what it installs from. Not $(PY) itself: that is a symlink to an interpreter outside the
# project, whose time `touch` would change.
DEPS := $(VENV)/.deps-stamp

$(DEPS): pyproject.toml scripts/install-deps.sh
	bash scripts/install-deps.sh $(VENV)

setup: $(DEPS)

proto: $(DEPS)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. protos/drctl/v1/replication.proto

proto-check: proto
	git diff --exit-code -- drctl/v1 || (echo "generated protobuf code is stale: run make proto"; exit 1)

lint: $(DEPS)
	$(VENV)/bin/ruff check .

typecheck: $(DEPS)
	$(VENV)/bin/mypy

test: $(DEPS) lint typecheck
	$(PY) -m pytest -q -rs

test-fast: $(DEPS)
	$(PY) -m pytest -q -m "not slow"

demo: $(DEPS)
	$(PY) -m drctl.demo

bench: $(DEPS)
	$(PY) bench/replication.py

clean:
	rm -rf build *.egg-info .mypy_cache .pytest_cache .ruff_cache
