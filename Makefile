# The two front-door commands (see README): `make demo` and `make test`.
# Both create .venv with the machine's python3 and install into it; nothing global.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test schema clean

demo: $(VENV)/.runtime
	$(BIN)/creditpool serve --demo

test: $(VENV)/.test
	$(BIN)/python -m pytest

schema: $(VENV)/.runtime
	$(BIN)/creditpool export-schema

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.runtime

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
