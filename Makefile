# Two entry points on a fresh Debian machine with Python 3.11:
#   make demo   - set up .venv and run the main job on the bundled model
#   make test   - set up .venv and run the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/blockffn eval --text blockffn/bundled/heldout.txt.xz --max-tokens 65536
	$(BIN)/blockffn-compile --target cpu --output dist/blockffn-tiny-q0f32-cpu --overwrite
	$(BIN)/blockffn inspect dist/blockffn-tiny-q0f32-cpu
	$(BIN)/blockffn generate --artifact dist/blockffn-tiny-q0f32-cpu --prompt "The President said that" --max-tokens 48 --greedy
	$(BIN)/blockffn generate --artifact dist/blockffn-tiny-q0f32-cpu --prompt "The President said that" --max-tokens 48 --greedy --speculative auto
	$(BIN)/blockffn generate --prompt "The President said that" --max-tokens 48 --greedy

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
