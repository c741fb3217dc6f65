# The README's two commands are `make run` and `make test`; both install first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
# No ORCH_ variables here: `make run`, `orch serve` and every `orch` command share the same
# defaults (the state dir .orch, its orch.db), so the CLI sees what `make run` serves.
# Run as root, engines run as `nobody` (README, "Security"), which needs an interpreter it can
# run; ours may sit under /root. The reference engine needs only the standard library.
ENGINE_PY := $(firstword $(wildcard /usr/bin/python3 /usr/local/bin/python3))

# What the PostgreSQL pass runs: the suites whose outcome depends on the database (the registry,
# leases, compare-and-set, quota, rate limit, recovery, replicas), on the local driver; the rest
# (HTTP shapes, the CLI, the Nomad double, the browser) adds no database behaviour.
PG_SUITES := tests/unit/test_registry_policy.py tests/unit/test_runner.py tests/unit/test_operations.py \
	tests/unit/test_admitter.py tests/unit/test_reconciler.py tests/integration/test_concurrency.py \
	tests/integration/test_replicas.py tests/integration/test_faults.py tests/integration/test_product_ids.py \
	tests/integration/test_crash_mid_destroy.py tests/integration/test_errors.py::test_database_unavailable \
	tests/integration/test_pool.py::test_200_admits_for_50_new_users_on_two_replicas_take_exactly_the_pool

# Most tests wait on processes (engines booting, orchestrators starting), not on the CPU: four
# workers keep two cores busy. worksteal, because a few tests (the fuzz, the storms) take far
# longer than the rest. (Not loadgroup nor loadfile: they key tests by node id, and
# schemathesis gives every operation's item the same one, so all but one would be dropped.)
TEST_WORKERS ?= 4
PYTEST_PAR := -n $(TEST_WORKERS) --dist worksteal

.PHONY: install run down test unit integration bench lint nomad-dev clean

# Install what you use: `make run` the server's runtime only; `make test`, `make lint` and
# `make install` the test and lint tools too. Each stamp says which set the venv holds.
$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[server]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[server,test]'
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/orch products ensure demo
	@if [ "$$(id -u)" = 0 ] && [ "$${ORCH_DRIVER:-local}" = local ] && [ -z "$$ORCH_ENGINE_CMD" ] \
	    && [ -z "$$ORCH_ENGINE_USER" ] && [ -n "$(ENGINE_PY)" ]; then \
	  echo "engines run as nobody, under $(ENGINE_PY) (ORCH_ENGINE_CMD)"; \
	  export ORCH_ENGINE_CMD="$(ENGINE_PY) $(CURDIR)/app/refengine"; \
	fi; exec $(BIN)/orch serve

down: $(RUN_STAMP)
	$(BIN)/orch down

test: install
	$(BIN)/pytest -q $(PYTEST_PAR) tests/unit tests/integration
	@if [ -n "$$ORCH_TEST_POSTGRES" ]; then \
		echo "== the database-facing suites again, on PostgreSQL ($$ORCH_TEST_POSTGRES)"; \
		ORCH_TEST_DB=postgres $(BIN)/pytest -q $(PYTEST_PAR) -p no:cacheprovider $(PG_SUITES) -k "not nomad"; \
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

# Engines first (their brains are under .orch): `orch down` stops this state dir's server and
# engines; when it cannot, nothing is removed.
clean:
	@if [ -e .orch ] && [ -x $(BIN)/orch ]; then \
	  $(BIN)/orch down || { echo "make clean: orch down failed; nothing removed"; exit 1; }; \
	elif [ -e .orch ]; then \
	  echo "make clean: .orch is there but $(BIN)/orch is not: run make down first"; exit 1; \
	fi
	rm -rf $(VENV) .orch .pytest_cache
