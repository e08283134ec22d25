# Two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install everything into it.
PYTHON ?= python3
VENV   ?= .venv
# torch is pinned to the build these machines carry locally (CPU, seconds to
# install); override e.g. `make test TORCH=torch==2.5.1` elsewhere.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

install: $(STAMP)

# fairseq-fixed compiles Cython extensions against torch: install torch, numpy
# and cython first and build fairseq without isolation, otherwise pip pulls a
# multi-GB CUDA torch into the isolated build environment.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" numpy cython
	$(BIN)/python -m pip install -q --no-build-isolation fairseq-fixed==0.12.3.1
	# also installs the pinned ctranslate2 (setup.py), one wheel for CPU and CUDA
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,plot]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash examples/quickstart.sh

# The suite runs in TEST_JOBS processes (pytest-xdist), each test file on one of
# them so that its fixtures are built once: its subprocesses run on one thread
# (tests/helpers.py), so one process leaves a core idle (2 cores, 2026-12-06:
# 11 min instead of 17).  TEST_JOBS: logical (a process per logical CPU), a number,
# or 0 for this process alone.
TEST_JOBS ?= logical
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

test: $(STAMP)
	$(PYTEST) tests

# Slow end-to-end checks (recipes on a Bible slice) are behind the `slow` marker.
test-all: $(STAMP)
	$(PYTEST) -m "slow or not slow" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/kd_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
