# The two commands of the README: `make demo` (train a small Lens on the CPU, sample, score,
# export: lens_jax/demo.py, docs/demo.md) and `make test`. `make ablation`: dense vs short captions;
# `make demo-lora` (after `make demo`): teach demo_out's model a new colour with LoRA.
# Both create the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The demo targets train and sample on the CPU. XLA:CPU allocates each execution's temporaries
# fresh (the demo's training step: one 108 MiB block a step), which glibc maps anew each time, and
# the kernel faults in and zeroes 4 KiB pages (~29k page faults a step). glibc's
# `glibc.malloc.hugetlb=1` tunable asks for transparent huge pages on what malloc maps
# (madvise(MADV_HUGEPAGE): used where /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or
# "always", a no-op elsewhere): 20x fewer faults and ~17% faster demo training steps on the 2-core
# CPU (docs/demo.md). Appended to any GLIBC_TUNABLES of the caller; `make demo CPU_ENV=` turns it off.
# JAX_PLATFORMS=cpu (unless the caller sets JAX_PLATFORMS): the venv holds libtpu for the TPU
# compile tests, and on a host without a TPU its start-up prints an "E0000 ... INVALID_ARGUMENT"
# line about TPU_WORKER_HOSTNAMES before falling back to the CPU. The demo targets the CPU; set
# JAX_PLATFORMS yourself to run it on another backend.
CPU_ENV ?= GLIBC_TUNABLES=$${GLIBC_TUNABLES:+$$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1 \
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu}

.PHONY: test venv clean bench demo demo-lora ablation constraints

# constraints.txt: the exact versions the suite passed with; setup.py keeps compatible ranges for
# people who install the library into their own environment.
$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@# libtpu lets tests/tpu compile for TPU slices on this host; where it cannot be installed
	@# (no wheel for this platform) those tests skip, and -rs prints why.
	$(PY) -m pip install -q -c constraints.txt -e '.[tpu]' || echo "make: libtpu not installed: tests/tpu compile tests will skip"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q -rs $(PYTEST_ARGS) tests

demo: $(VENV)/.installed
	$(CPU_ENV) $(PY) -m lens_jax.demo --out demo_out

demo-lora: $(VENV)/.installed
	$(CPU_ENV) $(PY) -m lens_jax.demo lora --base demo_out --out demo_lora_out

ablation: $(VENV)/.installed
	$(CPU_ENV) $(PY) -m lens_jax.demo ablation --out ablation_out

bench: $(VENV)/.installed
	$(PY) benchmarks/denoiser.py

# Rewrites constraints.txt from the environment (after an upgrade that passed make test).
constraints: $(VENV)/.installed
	{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^lens[-_]jax'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
