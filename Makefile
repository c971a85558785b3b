# The install ordering that matters: torch first, then the extension compiled
# against that torch with build isolation off.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: deps install demo test bench info clean anchor-wheels

deps:
	$(PIP) install -q torch numpy pytest ninja transformers tqdm pyyaml matplotlib

install: deps
	$(PIP) install -q --no-build-isolation -e .

info: install
	$(PYTHON) -m rlhf_kernels.info

demo: install
	$(PYTHON) -m rlhf_kernels.info
	$(PYTHON) -m rlhf_trainer demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/run.py

clean:
	rm -rf build *.egg-info rlhf_kernels/_C*.so rlhf_kernels/_build_info.json

# Wheels of the comparison libraries for an offline GPU machine running
# benchmarks/gpu_check.sh (pure Python; torch and triton come from that machine).
ANCHOR_PY ?= 3.12
anchor-wheels:
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(ANCHOR_PY) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl liger-kernel cut-cross-entropy
