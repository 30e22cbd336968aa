# The two commands of the README's quick start: `make up` and `make test`.
# Both install everything they need into a project-local virtualenv (.venv).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test install lint clean

# Reinstall when the package definition or the .proto contracts change (stubs are
# generated at install time by setup.py).
$(STAMP): pyproject.toml setup.py $(wildcard proto/*.proto)
	@# Debian ships venv separately (python3-venv): install it when it is missing.
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
	  { rm -rf $(VENV); apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build on this machine's disk (see pyproject.toml).
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/thaw up

# ruff and mypy run first: CI fails on a lint or type error as on a failing test.
test: $(STAMP) lint
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy core gateway scheduler platform snapshotter blobstore ops bench

clean:
	rm -rf $(VENV) .thaw *.egg-info
