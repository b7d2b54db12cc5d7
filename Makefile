# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both bootstrap .venv (the CPU stack of DESIGN.md section 5) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

# torchrec's metadata requires the CUDA fbgemm-gpu wheel (2.7 GB); it is installed with
# --no-deps beside fbgemm-gpu-cpu, and its real dependencies are named here.
TORCH := torch==2.13.0
TORCHREC := torchrec==1.8.0
TORCHREC_DEPS := fbgemm-gpu-cpu==1.8.0 tensordict torchmetrics==1.0.3 tqdm pyre-extensions iopath numpy
# the tests also run our Triton kernels on the CPU, under Triton's interpreter (the GPU
# host's version)
TRITON := triton==3.6.0

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install --no-deps $(TORCHREC)
	$(PIP) install $(TORCHREC_DEPS)
	$(PIP) install --no-build-isolation -e '.[test,bench]' || $(PIP) install -e '.[test,bench]'
	$(PY) -c "import torch, torchrec, fbgemm_gpu, afmrec.launch.cli"
	touch $(STAMP)

# The demo runs the distributed path: 2 CPU ranks (gloo), tables sharded table-wise.
NPROC ?= 2
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) $(VENV)/bin/afmrec demo --out runs/demo --device cpu

$(TEST_STAMP): $(STAMP)
	$(PIP) install $(TRITON)
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
