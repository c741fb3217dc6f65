# The README's two commands are `make run` and `make test`; both install first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export ORCH_STATE_DIR ?= .orch
export ORCH_DATABASE_URL ?= sqlite:///$(ORCH_STATE_DIR)/orch.db

.PHONY: install run test unit integration bench lint nomad-dev clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	mkdir -p $(ORCH_STATE_DIR)
	$(BIN)/orch products ensure demo
	$(BIN)/orch serve

test: install
	$(BIN)/pytest -q tests/unit tests/integration
	@if [ -n "$$ORCH_TEST_POSTGRES" ]; then \
		echo "== the database-facing suites again, on PostgreSQL ($$ORCH_TEST_POSTGRES)"; \
		ORCH_TEST_DB=postgres $(BIN)/pytest -q -p no:cacheprovider tests/unit/test_registry_policy.py tests/integration \
			-k "not nomad" --ignore=tests/integration/test_client.py; \
	else \
		echo "PostgreSQL: not run (set ORCH_TEST_POSTGRES=postgresql://user:pass@127.0.0.1:5432/postgres; .ci/postgres.sh sets one up)"; \
	fi

unit: install
	$(BIN)/pytest -q tests/unit

integration: install  # NOMAD_REAL=1: the Nomad scenarios against real agents (make nomad-dev)
	$(BIN)/pytest -q tests/integration

bench: install
	$(BIN)/python -m tests.bench

lint: install
	$(BIN)/ruff check app tests
	$(BIN)/mypy

nomad-dev:
	@command -v nomad >/dev/null && command -v consul >/dev/null || { echo "nomad-dev: needs the nomad and consul binaries on PATH (see nomad/README.md)"; exit 1; }
	bash nomad/dev.sh

clean:
	rm -rf $(VENV) .orch .pytest_cache
