# Two entry points (see README): `make demo` and `make test`. Each creates .venv and installs
# what it needs first, so a fresh machine needs nothing but Python >= 3.11.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= two red circles above a blue square

.PHONY: install demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch 2.13.0 first: on the project's machines it is a CPU build served from local disk.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

# One torch thread: small-batch CPU sampling stalls at thread barriers on a shared machine
# (docs/benchmarks.md, Generation); raise DEMO_THREADS on an idle one.
DEMO_THREADS ?= 1

# The prompt reaches the shell as an environment variable, never as command text: quotes, `...`,
# ; or \ in it stay part of the prompt (make itself still reads $(...) in it, as in any variable).
demo: export PROMPT := $(PROMPT)
demo: $(STAMP)
	$(BIN)/miro generate "$$PROMPT" --n 8 --seed 0 --threads $(DEMO_THREADS) --out miro-out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20 -p no:cacheprovider

clean:
	rm -rf $(VENV) miro-out
