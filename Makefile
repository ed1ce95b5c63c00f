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

# the minute-long tests (marked slow: end-to-end comparisons, the RLIMIT_AS fallback, ...)
test-slow: setup
	$(BIN)/python -m pytest -m slow -s

# the whole stack in the foreground from the Procfile; Ctrl-C stops every process
up: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(BIN)/honcho start

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/python -m pip install --quiet ruff==0.17.6 mypy==2.4.1
	$(BIN)/ruff check api shared services worker tests bench examples
	@# mypy cannot follow the editable install's folder mapping (gymbus is api/, gymbus.shared is
	@# shared/, and so on: an import hook, not a folder): it reads the same files through links
	@rm -rf build/typecheck && mkdir -p build/typecheck/gymbus
	@for f in api/*; do ln -sfn "$(CURDIR)/$$f" build/typecheck/gymbus/; done
	@for d in shared services worker; do ln -sfn "$(CURDIR)/$$d" build/typecheck/gymbus/$$d; done
	cd build/typecheck && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		-p gymbus

clean:
	rm -rf $(VENV) build *.egg-info
