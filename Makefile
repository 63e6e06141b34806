# `make test` and `make demo` work on a fresh clone: each creates .venv and installs the project when missing.
# `make test-oldest` does the same in .venv-oldest with every runtime dependency at its declared lower bound.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
OLDEST := .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed

.PHONY: test test-oldest demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Runtime dependencies pinned at their lower bounds (tools/lower_bounds.py); the dev tools resolve as usual.
$(OLDEST_STAMP): pyproject.toml tools/lower_bounds.py
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python tools/lower_bounds.py pyproject.toml > $(OLDEST)/lower-bounds.txt
	$(OLDEST)/bin/python -m pip install --quiet -c $(OLDEST)/lower-bounds.txt -e '.[dev]'
	touch $(OLDEST_STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -m pip list --format=freeze | grep -iE "^($$(cut -d= -f1 $(OLDEST)/lower-bounds.txt | paste -sd'|'))=="
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(VENV)/bin/python cli.py fit --recipe demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache
