# The two commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Transparent huge pages for malloc'd memory: XLA:CPU allocates each step's temporaries anew, and
# on VMs with free-page reporting every first touch of a 4 KiB page faults (docs/performance.md:
# 15M -> 0.6M page faults and 5% less wall time for 400 demo steps). glibc ignores unknown tunables.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install test demo bench parity clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python launch.py --config configs/synthetic_shapes.py --workdir runs/demo

parity: $(STAMP)
	$(BIN)/python -m pointrend_jax.tools.d2_parity ../shared/fixtures/detectron2_parity/ops.npz

bench: $(STAMP)
	$(BIN)/python bench/ops.py

clean:
	rm -rf $(VENV) .pytest_cache
