# Two commands for a newcomer: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-all lint typecheck pytest pytest-slow run clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[web,uvloop,embedded]" --group dev
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest processes, each with its own PostgreSQL: most of the suite waits on processes
# and the database, so this halves the wall time on two cores.
pytest: $(STAMP)
	$(BIN)/pytest -n 2 -m "not slow"

# The slow tier: the fault suite (kill -9, SIGSTOP, PostgreSQL restarts), the short soak and
# bench runs, the wheel built and installed in fresh virtualenvs, the README's guide in a
# fresh project, `make run` itself. CI runs it after `make test`.
pytest-slow: $(STAMP)
	$(BIN)/pytest -n 2 -m slow

test: lint typecheck pytest

test-slow: pytest-slow

test-all: test test-slow

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

run: $(STAMP)
	$(BIN)/python -m app.dev

# The benchmark suite against pgqueuer, procrastinate and a raw-SQL baseline (bench/README.md):
# `make bench` (full) or `make bench BENCH_ARGS=--quick` (about 2 minutes).
.PHONY: bench
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[web,uvloop,embedded]" --group bench
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# What bounds the targets `make bench` misses: the ways of enqueueing one job side by side
# (bench/README.md, "What bounds the targets missed"), about 40 s.
.PHONY: bench-bounds
bench-bounds: $(STAMP)
	$(BIN)/pip install --quiet -e ".[web,uvloop,embedded]" --group bench
	$(BIN)/python -m bench.bounds

# The soak (tests/soak/): steady enqueueing through HTTP, Python and SQL, with a share of
# hostile jobs, while workers are killed, stopped and restarted, PostgreSQL restarted,
# connections killed and rows locked from another session; then every invariant is checked
# and a table printed. Not part of `make test` (a short one is in `make test-slow`). A few
# minutes by default: `make soak SOAK_ARGS="--minutes 20 --rate 110"` for the long run.
.PHONY: soak
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python -m tests.soak $(SOAK_ARGS)
