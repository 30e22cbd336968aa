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

# Packages held to `mypy --strict` (every package of thaw; examples and tests are not).
STRICT_PACKAGES := core blobstore snapshotter platform scheduler gateway ops bench client
# The folders of thaw.<folder>. mypy does not see the editable install's import hook
# (thaw.<folder> -> <folder>/), and import-linter names a namespace package (platform,
# proto) after its folder's path: both read the packages through this tree of links,
# $(THAW_TREE)/thaw/<folder> -> <folder>, so mypy types the strict packages' imports of
# each other and every module is thaw.<folder>.<...> to import-linter.
FOLDERS := core proto gateway scheduler platform snapshotter blobstore ops bench client
THAW_TREE := $(VENV)/thaw-tree

# ruff, strict mypy, then the import contracts of .importlinter: the
# layers, ops and bench as clients, no cycles.
lint: $(STAMP)
	$(BIN)/ruff check .
	@mkdir -p $(THAW_TREE)/thaw
	@for folder in $(FOLDERS); do ln -sfn "$(CURDIR)/$$folder" "$(THAW_TREE)/thaw/$$folder"; done
	MYPYPATH=$(THAW_TREE) $(BIN)/mypy --strict $(addprefix -p thaw.,$(STRICT_PACKAGES))
	cd $(THAW_TREE) && "$(CURDIR)/$(BIN)/lint-imports" --no-logo "$(CURDIR)/.importlinter"

clean:
	rm -rf $(VENV) .thaw *.egg-info
