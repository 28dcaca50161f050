# One entry point for every check: `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test check fmt lint typecheck pytest bench soak fuzz system-deps bench-deps clean

# What the agent needs to run (no test or lint tools: `make run` starts fast on a fresh clone).
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[fast]'
	touch $(RUN_STAMP)

# Everything the checks need, on top.
$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

## run: start the agent with the example services and the example job (host mode: no root needed)
run: $(RUN_STAMP)
	$(BIN)/waypost agent --dev --config examples/services.hcl --job examples/web.nomad.hcl

## test: install what the tests need (apt packages when root), then every check
test: system-deps $(STAMP)
	$(MAKE) check

check: fmt lint typecheck pytest

fmt:
	$(BIN)/ruff format --check discovery netsetup tests

lint:
	$(BIN)/ruff check discovery netsetup tests

typecheck:
	$(BIN)/mypy --strict discovery netsetup

pytest:
	$(BIN)/pytest -q

system-deps:
	./.ci/system-deps test

bench-deps: $(STAMP)
	./.ci/system-deps bench

## bench: the benchmarks in tests/bench (not part of the test suite)
bench: bench-deps
	$(BIN)/python -m tests.bench.dns_qps
	$(BIN)/python -m tests.bench.http_api
	$(BIN)/python -m tests.bench.mirror_sync
	$(BIN)/python -m tests.bench.net_setup
	$(BIN)/python -m tests.bench.task_start

## soak: 60 s of DNS at half its peak, registration churn and a job run and stopped every second
soak: bench-deps
	$(BIN)/python -m tests.bench.soak --duration 60

## fuzz: coverage-guided fuzzing of the DNS wire handler (atheris), 200,000 inputs or 60 s
fuzz: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check atheris
	$(BIN)/python -m tests.bench.fuzz_dns -runs=200000 -max_total_time=60

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
