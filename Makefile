# Every target creates or updates .venv itself: a fresh clone needs nothing else.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m drsvc.demo --root var

# tests/test_postgres.py runs a real PostgreSQL (initdb, pg_ctl, pg_basebackup, pg_waldump) as `postgres`
test: $(STAMP)
	ls /usr/lib/postgresql/*/bin/pg_basebackup >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq postgresql; }
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check drsvc snapshot replicator restore tests benchmarks
	$(BIN)/ruff format --check drsvc snapshot replicator restore tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	command -v restic >/dev/null && command -v rclone >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq restic rclone; }
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.replication
	$(BIN)/python -m benchmarks.prune
	$(BIN)/python -m benchmarks.scrub
	$(BIN)/python -m benchmarks.loglag
	$(BIN)/python -m benchmarks.watchlag
	$(BIN)/python -m benchmarks.wal

clean:
	rm -rf $(VENV) var
