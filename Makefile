# Entry points: `make demo`, `make test` (the whole suite), `make test-fast` (the unit tier:
# no test marked slow) and `make lint` (ruff). Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-fast lint install clean

# what `make lint` checks (rules and line length: pyproject.toml)
LINT_PATHS := keras_vae_attn trainers export pipeline bench tests docs setup.py

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m trainers.mvtec --category demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q tests

# the tests that train, export or spawn trainers and pipelines are marked slow
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) runs
