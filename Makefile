VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup proto proto-check lint typecheck test test-fast demo bench clean

$(PY): pyproject.toml scripts/install-deps.sh
	bash scripts/install-deps.sh $(VENV)
	touch $(PY)

setup: $(PY)

proto: $(PY)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. protos/drctl/v1/replication.proto

proto-check: proto
	git diff --exit-code -- drctl/v1 || (echo "generated protobuf code is stale: run make proto"; exit 1)

lint: $(PY)
	$(VENV)/bin/ruff check .

typecheck: $(PY)
	$(VENV)/bin/mypy

test: $(PY) lint typecheck
	$(PY) -m pytest -q -rs

test-fast: $(PY)
	$(PY) -m pytest -q -m "not slow"

demo: $(PY)
	$(PY) -m drctl.demo

bench: $(PY)
	$(PY) bench/replication.py

clean:
	rm -rf build *.egg-info .mypy_cache .pytest_cache .ruff_cache
