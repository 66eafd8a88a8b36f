# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ijepa_toolkit.demo

# One BLAS/OpenMP thread per process: the suite runs many small models and 2-process DDP tests,
# which oversubscribe a 2-core machine badly with the default thread count (about 10x slower).
# Two pytest workers (pytest-xdist), a test file per worker at a time (module fixtures built once):
# both cores busy, the suite in about half the time of one process.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $${TEST_WORKERS:-2} --dist loadfile

# Every comparison against the real alternatives (bench/all.py; < 20 min on the 2-core CPU
# machine). The bench extra adds the contenders (faiss-cpu, transformers). The official I-JEPA
# code is never part of the project: point IJEPA_OFFICIAL_SRC at a facebookresearch/ijepa
# checkout (the folder holding src/) to time its step too.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) bench/all.py $(if $(IJEPA_OFFICIAL_SRC),--official-src $(IJEPA_OFFICIAL_SRC),)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
