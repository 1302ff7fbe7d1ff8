# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The LLaMA-Factory test tier's own venv (real llamafactory-cli; tests/llamafactory/).
LF_VENV ?= .venv-lf

.PHONY: demo test lint setup clean lf-venv slurm-packages

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip            # >= 25.1 understands --group (PEP 735)
	$(PY) -m pip install -q torch==2.13.0            # the CPU wheel; pinned only here, not for users
	$(PY) -m pip install -q -e '.[train,plot]' --group dev   # plot: the demo's memory.png
	touch $(STAMP)

setup: $(STAMP)

# Builds (or, when current, leaves) the LLaMA-Factory venv; the tier also calls this itself.
lf-venv:
	bash tests/llamafactory/build_venv.sh $(LF_VENV)

# The SLURM tier's packages (Debian's slurm-wlm and munge), installed when missing and root.
# Where that fails the tier (tests/slurm/) skips with the reason; the rest of `make test` runs.
slurm-packages:
	-bash tests/slurm/cluster.sh install

demo: $(STAMP)
	$(VENV)/bin/oom-supervisor demo          # act 1: told the device, predicts, fits at once
	$(VENV)/bin/oom-supervisor demo --walk   # act 2: not told, walks the ladder for real

test: $(STAMP) lf-venv slurm-packages
	OOM_SUPERVISOR_LF_VENV=$(abspath $(LF_VENV)) $(PY) -m pytest -n 2 --dist loadgroup --durations=15 $(PYTEST_ARGS)
	$(PY) -m ruff check supervisor tests
	$(PY) -m mypy

lint: $(STAMP)
	$(PY) -m ruff check supervisor tests
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(LF_VENV) .venv-trl .venv-axolotl runs .pytest_cache .mypy_cache .ruff_cache
