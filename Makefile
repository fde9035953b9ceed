# Set-up and checks. `make test` is what CI runs (.ci/run); `make compare` is the main job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint typecheck proto-check pytest compare serve-torch serve-tf clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[torch,tf,loadtest,dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

proto-check: $(STAMP)
	$(PY) proto/generate.py --check

pytest: $(STAMP)
	$(PY) -m pytest -q

test: lint typecheck proto-check pytest

compare: $(STAMP)
	$(PY) -m loadtest compare $(COMPARE_ARGS)

serve-torch: $(STAMP)
	$(PY) -m torch_server serve --model mlp

serve-tf: $(STAMP)
	$(PY) -m tf_server serve --model mlp

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache reports
