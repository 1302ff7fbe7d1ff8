# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip            # >= 25.1 understands --group (PEP 735)
	$(PY) -m pip install -q torch==2.13.0            # the CPU wheel; pinned only here, not for users
	$(PY) -m pip install -q -e '.[train]' --group dev
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/oom-supervisor demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m ruff check supervisor tests
	$(PY) -m mypy

lint: $(STAMP)
	$(PY) -m ruff check supervisor tests
	$(PY) -m mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
