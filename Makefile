# The commands of the README: `make demo`, `make test` and `make test-fast`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Transparent huge pages for malloc'd memory: XLA:CPU allocates each step's temporaries anew, and
# on VMs with free-page reporting every first touch of a 4 KiB page faults (docs/performance.md:
# 15M -> 0.6M page faults and 5% less wall time for 400 demo steps). glibc ignores unknown tunables.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

# pytest-xdist workers: `auto` is one per physical core. Files are the unit of distribution
# (--dist loadfile): a file's module fixtures (a tiny training run, a reference launch) are built
# once, in one worker.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: install test test-fast demo bench parity clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PYTEST) tests

# Everything but the tests marked slow (subprocess runs of launch.py and the tools, training
# runs, multi-process and multi-device runs, whole-model parity).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python launch.py --config configs/synthetic_shapes.py --workdir runs/demo

parity: $(STAMP)
	$(BIN)/python -m pointrend_jax.tools.d2_parity ../shared/fixtures/detectron2_parity/ops.npz

bench: $(STAMP)
	$(BIN)/python bench/ops.py

clean:
	rm -rf $(VENV) .pytest_cache
