# gymbus: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test test-slow bench lint up clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test,qt]'
	@touch $(STAMP)

demo: setup
	$(BIN)/python -m gymbus.services.stack.demo

test: setup
	$(BIN)/python -m pytest

# the minute-long measurements (the stalled-viewer test), on a quiet machine
test-slow: setup
	$(BIN)/python -m pytest -m slow -s

# the whole stack in the foreground from the Procfile; Ctrl-C stops every process
up: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(BIN)/honcho start

bench: setup
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/ruff check shared services worker tests
	@# mypy cannot follow the editable install's folder mapping (gymbus.shared is shared/, and so
	@# on: an import hook, not a folder): it reads the same files through a view of links
	@mkdir -p build/typecheck/gymbus
	@for d in shared services worker; do ln -sfn "$(CURDIR)/$$d" build/typecheck/gymbus/$$d; done
	cd build/typecheck && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		-p gymbus.shared -p gymbus.services -p gymbus.worker

clean:
	rm -rf $(VENV) build *.egg-info
