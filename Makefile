PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LATEST := .venv-latest
N ?= 10


.PHONY: deb test check lint types unit integration test-skew test-crash crash test-systemd run bench bench-rss soak lock test-latest test-repeat clean

# Every install of ours takes the exact versions (and hashes) of the lock; the
# project itself goes in last, editable, built by the locked setuptools.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP) check test-skew test-crash test-systemd

check: lint types unit integration

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

# The fast tier alone (no processes, a few seconds).
unit: $(STAMP)
	$(BIN)/pytest tests/unit

# Real daemons on real sockets, and the pytest plugin as a user runs it.
integration: $(STAMP)
	$(BIN)/pytest tests/integration tests/plugin

# The previous release (its git tag, in a venv of its own under .pair/) and this tree
# mixed under load, by a seeded random plan it prints (PAIR_SKEW_SEED=N replays one).
test-skew: $(STAMP)
	$(BIN)/pytest tests/skew -p no:randomly -s

# Power cuts drawn from a seed (printed; PAIR_CRASH_SEED=N replays, PAIR_CRASH_CUTS=N
# sets how many), each rebuilt as the disk would hold it and checked (tests/crash/).
test-crash: $(STAMP)
	$(BIN)/pytest tests/crash -p no:randomly -s

# N power cuts (SEED=... replays a run), each plan and what it found printed.
crash: $(STAMP)
	$(BIN)/python -m tests.crash $(N) $(SEED)

# The pair under the real systemd, booted in namespaces of its own (root; see
# tests/systemd/machine.py): installed by deploy/install.sh, driven with systemctl.
test-systemd: $(STAMP)
	$(BIN)/pytest tests/systemd -p no:randomly

# The Debian packages in dist/ (README, "Install on a host"): Debian's debhelper and
# lintian, the system's Python; the locked wheels are fetched once, the build is offline.
SYSTEM_PYTHON_VERSION = $(shell /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
WHEELHOUSE = .pair/wheelhouse-$(SYSTEM_PYTHON_VERSION)
deb: $(STAMP)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
		--only-binary=:all: --python-version $(SYSTEM_PYTHON_VERSION) \
		-r deploy/requirements-runtime.lock -d $(WHEELHOUSE)
	/usr/bin/python3 deploy/build-deb --wheelhouse $(WHEELHOUSE) --lintian

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

# Re-resolve every dependency to the newest release the ranges in pyproject.toml
# allow, for every platform, with hashes.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes --upgrade --quiet -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml deploy/build-requirements.in --universal \
		--python-version 3.11 --generate-hashes --quiet -c $(LOCK) -o deploy/requirements-runtime.lock

# The suite on the newest releases the ranges allow, in a venv of its own: finds
# upstream drift on purpose, before a `make lock` takes it in.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade -e '.[dev]'
	$(LATEST)/bin/pip list --format freeze | grep -iE '^(anyio|msgspec|apsw|uvloop|pytest|mypy|ruff)='
	touch $(LATEST)/.installed
	$(MAKE) --no-print-directory check VENV=$(LATEST)

# The whole suite N times, each in a random order with a fresh seed (pytest-randomly);
# a failed run's seed reproduces its order: pytest -p randomly --randomly-seed=SEED
test-repeat: $(STAMP)
	@mkdir -p .pair; passed=0; for i in $$(seq $(N)); do \
		seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
		if $(BIN)/pytest -q -p no:cacheprovider -p randomly --randomly-seed=$$seed \
			>.pair/test-repeat-$$i.log 2>&1; then result=passed; passed=$$((passed + 1)); \
		else result=FAILED; fi; \
		echo "run $$i/$(N) seed=$$seed $$result: $$(tail -n 1 .pair/test-repeat-$$i.log)"; \
	done; echo "$$passed of $(N) runs passed (logs: .pair/test-repeat-*.log)"; test $$passed -eq $(N)

clean:
	rm -rf $(VENV) $(LATEST) .pair dist .pytest_cache .mypy_cache .ruff_cache
