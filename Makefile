# Two commands on a fresh machine: `make demo` and `make test` (both set everything up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-out
# A fixed, public demo key: never use it for real data (`protect keygen` makes a real one).
DEMO_KEY ?= demo-key-not-a-secret
# `make test` runs one pytest-xdist worker per core (at most 4: the suite's long modules are few),
# each with one torch thread; a module stays on one worker (its fixtures are made once), and the
# longest modules start first (tests/conftest.py: LONG_MODULES).
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1))))")

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	PROTECT_KEY=$(DEMO_KEY) $(VENV)/bin/protect images --overwrite samples/cifar10/train $(DEMO_OUT)/cifar10-train
	PROTECT_KEY=$(DEMO_KEY) $(VENV)/bin/protect images --overwrite samples/kodak/ --labels samples/kodak/labels.csv $(DEMO_OUT)/kodak
	PROTECT_KEY=$(DEMO_KEY) $(VENV)/bin/protect images --overwrite --method uc --surrogate cifar-resnet20 samples/cifar10/train $(DEMO_OUT)/cifar10-uc
	$(VENV)/bin/protect inspect $(DEMO_OUT)/cifar10-train

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test-all: setup
	$(PY) -m pytest -q -m ''

bench: setup
	$(PY) bench/throughput.py
	$(PY) bench/clusters.py --phases erm

clean:
	rm -rf $(DEMO_OUT) $(DEMO_OUT).protect .pytest_cache build *.egg-info
