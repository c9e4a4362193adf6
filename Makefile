# Quick start (see README):
#   make bench   set up .venv, build, run the end-to-end throughput comparison
#   make test    set up .venv, build, run the test suite
#   make digits-demo   train SPViT on scikit-learn's digits on the CPU (minutes), table + picture in benchmarks/results
#   make gpu-check     on a GPU machine (its own python, no venv): install, GPU tests, benchmarks in 8 minutes
#
# Variables: PYTHON (interpreter that creates the venv), VENV (its folder), MAX_JOBS (compile jobs),
# SPVIT_BUILD_CUDA (auto | 1 | 0, see setup.py), TORCH_CUDA_ARCH_LIST (default 8.0;9.0+PTX).
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.spvit-deps
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup build test bench digits-demo gpu-check clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(VPY)
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $(DEPS_STAMP)

setup: $(DEPS_STAMP)

build: setup
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	$(VPY) -m spvit_kernels.info

test: build
	$(VPY) -m pytest -q tests

bench: build
	$(VPY) benchmarks/throughput.py

digits-demo: build
	$(VPY) python/digits_demo.py --out build/digits_run

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf build spvit_kernels/*.so *.egg-info
