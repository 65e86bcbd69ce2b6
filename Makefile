# Set-up and entry points. `make demo` and `make test` create and reuse .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kaseg-installed

.PHONY: demo demo-quick demo-full test test-slow bench evidence clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## every stage on the built-in data set, then the report
	$(BIN)/kaseg demo --out runs/demo

demo-quick: $(STAMP)
	$(BIN)/kaseg demo --quick --out runs/demo-quick

demo-full: $(STAMP)  ## the demo on the configs' (and the evidence protocol's) 4000-iteration schedule: about an hour
	$(BIN)/kaseg demo --full

test: $(STAMP)  ## the default suite (slow checks excluded)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## only the long checks
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/affinity.py
	$(BIN)/python benchmarks/distill_step.py

evidence: $(STAMP)  ## the README's evidence: tune on the development seed, confirm on fresh seeds (resumable)
	$(BIN)/python scripts/evidence.py tune
	$(BIN)/python scripts/evidence.py select
	$(BIN)/python scripts/evidence.py confirm
	$(BIN)/python scripts/evidence.py table

clean:
	rm -rf $(VENV) runs build *.egg-info
