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

# On a GPU: make evidence EVIDENCE_ARGS="--device cuda --parallel 14"
evidence: $(STAMP)  ## the README's evidence: every missing run (tuning, selection, confirmation; resumable), then the tables
	$(BIN)/python scripts/evidence.py all $(EVIDENCE_ARGS)
	$(BIN)/python scripts/evidence.py table

clean:
	rm -rf $(VENV) runs build *.egg-info
