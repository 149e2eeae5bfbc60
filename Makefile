# The two commands of the README: `make demo` (once it exists) and `make test`.
# Both create the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test venv clean bench

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS) tests

bench: $(VENV)/.installed
	$(PY) benchmarks/denoiser.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
