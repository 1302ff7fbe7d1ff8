# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The real-tool test tiers' own venvs (tests/llamafactory, tests/trl, tests/axolotl), built with
# the dev group's uv, their downloads cached outside the clone (tests/tier_venv.sh).
LF_VENV ?= .venv-lf
TRL_VENV ?= .venv-trl
AXOLOTL_VENV ?= .venv-axolotl
TIER_ENV = OOM_SUPERVISOR_UV=$(abspath $(VENV))/bin/uv OOM_SUPERVISOR_LF_VENV=$(abspath $(LF_VENV)) \
	OOM_SUPERVISOR_TRL_VENV=$(abspath $(TRL_VENV)) OOM_SUPERVISOR_AXOLOTL_VENV=$(abspath $(AXOLOTL_VENV))

.PHONY: demo test lint setup clean lf-venv slurm-packages

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip            # >= 25.1 understands --group (PEP 735)
	$(PY) -m pip install -q torch==2.13.0            # the CPU wheel; pinned only here, not for users
	$(PY) -m pip install -q -e '.[train,plot]' --group dev   # plot: the demo's memory.png
	touch $(STAMP)

setup: $(STAMP)

# Builds (or, when current, leaves) the LLaMA-Factory venv; the tier also calls this itself.
lf-venv: $(STAMP)
	$(TIER_ENV) bash tests/llamafactory/build_venv.sh $(LF_VENV)

# The SLURM tier's packages (Debian's slurm-wlm and munge), installed when missing and root.
# Where that fails the tier (tests/slurm/) skips with the reason; the rest of `make test` runs.
slurm-packages:
	-bash tests/slurm/cluster.sh install

demo: $(STAMP)
	$(VENV)/bin/oom-supervisor demo          # act 1: told the device, predicts, fits at once
	$(VENV)/bin/oom-supervisor demo --walk   # act 2: not told, walks the ladder for real

# The tiers' venvs build in the background while the tests run (one line a minute each while
# building); a tier's conftest waits on the build's lock, then finds the venv current. Three
# workers on two cores: most tests wait on real processes and their timeouts, not the CPU.
# Unbuffered: the log shows each test as it ends, not a page at a time.
test: $(STAMP) slurm-packages
	@for tier in llamafactory:$(LF_VENV) trl:$(TRL_VENV) axolotl:$(AXOLOTL_VENV); do \
		$(TIER_ENV) bash tests/$${tier%%:*}/build_venv.sh $${tier#*:} > /dev/null & \
	done; \
	PYTHONUNBUFFERED=1 $(TIER_ENV) $(PY) -m pytest -n 3 --dist loadgroup --durations=15 $(PYTEST_ARGS); rc=$$?; \
	wait; exit $$rc
	$(PY) -m ruff check supervisor tests
	$(PY) -m mypy

lint: $(STAMP)
	$(PY) -m ruff check supervisor tests
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(LF_VENV) .venv-trl .venv-axolotl runs .pytest_cache .mypy_cache .ruff_cache
