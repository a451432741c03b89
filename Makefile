PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint types unit run bench bench-rss soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) lint types unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# Both daemons on the default paths (./.pair/run, ./.pair/state); Ctrl-C stops both.
run: $(STAMP)
	$(BIN)/pairctl up

# The fault suite's long randomised versions; prints what each scenario did.
soak: $(STAMP)
	PAIR_SOAK_ROUNDS=$${PAIR_SOAK_ROUNDS:-20} $(BIN)/pytest tests/integration/test_faults.py -s --timeout 1800

bench: $(STAMP)
	$(BIN)/python -m bench

# Each daemon's RSS at idle and over 60 s of mixed load (about 70 s).
bench-rss: $(STAMP)
	$(BIN)/python -m bench.rss

clean:
	rm -rf $(VENV) .pair .pytest_cache .mypy_cache .ruff_cache
