# The two commands of the README: `make demo` (train a small Lens on the CPU, sample, score,
# export: lens_jax/demo.py, docs/demo.md) and `make test`. `make ablation`: dense vs short captions.
# Both create the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test venv clean bench demo ablation

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# libtpu lets tests/tpu compile for TPU slices on this host; where it cannot be installed
	@# (no wheel for this platform) those tests skip, and -rs prints why.
	$(PY) -m pip install -q -e '.[tpu]' || echo "make: libtpu not installed: tests/tpu compile tests will skip"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q -rs $(PYTEST_ARGS) tests

demo: $(VENV)/.installed
	$(PY) -m lens_jax.demo --out demo_out

ablation: $(VENV)/.installed
	$(PY) -m lens_jax.demo ablation --out ablation_out

bench: $(VENV)/.installed
	$(PY) benchmarks/denoiser.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
