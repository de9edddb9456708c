# The two commands of the README: `make demo` and `make test`. Both create .venv
# and install the package on first use (Python >= 3.10 and pip are all they need).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make demo DATA=path/to/dataset runs the demo on real data instead of synthetic patches.
DATA ?=
DEMO := demo-output

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	DATA="$(DATA)" DEMO="$(DEMO)" HD="$(BIN)/histodetect" bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
