# Set-up and checks. `make test` is what CI runs (.ci/run); `make compare` is the main job.
# `make deploy-check` proves the compose deployment on a real Docker engine (CI runs it where one is).
# `make k8s-check` renders and validates deploy/k8s and ties it to the code (no cluster needed; CI runs it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint typecheck proto-check pytest compare serve-torch serve-tf wheelhouse deploy-check k8s-check clean

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

# The edit loop: every test but the slow ones (@pytest.mark.slow); `make test` runs them all.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

compare: $(STAMP)
	$(PY) -m loadtest compare $(COMPARE_ARGS)

serve-torch: $(STAMP)
	$(PY) -m torch_server serve --model mlp

serve-tf: $(STAMP)
	$(PY) -m tf_server serve --model mlp

# torch's CPU wheel for the CPU torch image (PyPI's Linux torch is the CUDA build).
wheelhouse:
	docker/wheelhouse.sh

# Build, start, load, scrape, compare, drain and take down the CPU compose stack (scripts/deploy_check.py).
deploy-check: $(STAMP)
	$(PY) -m scripts.deploy_check $(DEPLOY_CHECK_ARGS)

# deploy/k8s: every kustomization rendered (in Python), schema-validated, and checked against the servers'
# settings and CLIs (scripts/k8s_check.py); then the tests that break each check once.
k8s-check: $(STAMP)
	$(PY) -m scripts.k8s_check
	$(PY) -m pytest -q tests/integration/test_k8s.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache reports
