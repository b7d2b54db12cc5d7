# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both bootstrap .venv (the CPU stack of docs/install.md: torch CPU build, torchrec --no-deps, fbgemm-gpu-cpu) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

# torchrec's metadata requires the CUDA fbgemm-gpu wheel (2.7 GB); it is installed with
# --no-deps beside fbgemm-gpu-cpu, and its real dependencies are named here. It goes in
# last, after everything it needs: pip checks the dependencies of what a command installs
# (and of the packages that depend on it) unless --no-deps, and would print a resolver
# ERROR about the missing fbgemm-gpu that this CPU stack leaves out on purpose.
TORCH := torch==2.13.0
TORCHREC := torchrec==1.8.0
TORCHREC_DEPS := fbgemm-gpu-cpu==1.8.0 tensordict torchmetrics==1.0.3 tqdm pyre-extensions iopath numpy
# This project's own requirements (setup.cfg: install_requires and the test and bench
# extras) but torch and torchrec, which are pinned above.
OWN_DEPS = $$($(PY) -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
	reqs = [r.strip() for k in ('install_requires', 'test', 'bench') \
	for r in c['options' if k == 'install_requires' else 'options.extras_require'][k].splitlines()]; \
	print(' '.join(r for r in reqs if r and r.split('>')[0].split('=')[0] not in ('torch', 'torchrec')))")
# the tests also run our Triton kernels on the CPU, under Triton's interpreter (the GPU
# host's version)
TRITON := triton==3.6.0

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install $(TORCHREC_DEPS) $(OWN_DEPS)
	$(PIP) install --no-deps $(TORCHREC)
	$(PIP) install --no-deps --no-build-isolation -e . || $(PIP) install --no-deps -e .
	$(PY) -c "import torch, torchrec, fbgemm_gpu, afmrec.launch.cli"
	touch $(STAMP)

# The demo runs the distributed path: 2 CPU ranks (gloo), tables sharded table-wise.
NPROC ?= 2
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) $(VENV)/bin/afmrec demo --out runs/demo --device cpu

$(TEST_STAMP): $(STAMP)
	$(PIP) install $(TRITON)
	touch $(TEST_STAMP)

# Test files run on TEST_WORKERS processes (pytest-xdist), a file's tests on one of them
# (they share module fixtures): about 1.5x faster on 2 cores than one process.
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
