# The install ordering that matters: torch first, then the extension compiled
# against that torch with build isolation off.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: deps install demo test test-quick bench info clean anchor-wheels wheel smoke-wheel

deps:
	$(PIP) install -q torch numpy pytest pytest-xdist ninja transformers tqdm pyyaml matplotlib pydantic

# The editable install compiles the extension into build/ext (setup.py keeps one object folder
# for every build of the checkout, so only what changed recompiles), and is skipped altogether
# when nothing it compiles changed since it last succeeded
# (build/.installed) and the installed package still imports this checkout's extension,
# built for the torch now installed.
INSTALLED := build/.installed
CHECK_INSTALLED := import rlhf_trainer, torch; from rlhf_kernels import _ext; \
  assert _ext.loaded() and _ext._minor(_ext.BINARY['torch']) == _ext._minor(torch.__version__)

install: deps
	@if [ -f $(INSTALLED) ] && [ -z "$$(find csrc setup.py pyproject.toml -newer $(INSTALLED) -print -quit)" ] \
	    && $(PYTHON) -c "$(CHECK_INSTALLED)" 2>/dev/null; then \
	  echo "rlhf-kernels: the extension is up to date ($(INSTALLED)); not rebuilding"; \
	else \
	  $(PIP) install -q --no-build-isolation -e . && mkdir -p build && touch $(INSTALLED); \
	fi

info: install
	$(PYTHON) -m rlhf_kernels.info

demo: install
	$(PYTHON) -m rlhf_kernels.info
	$(PYTHON) -m rlhf_trainer demo

# pytest-xdist spreads the tests over the cores (at most 8 workers, one torch thread each): on
# the 2-core CI machine the multi-process trainer tests and the single-threaded Triton
# interpreter no longer wait for each other
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 8 ] && n=8; echo $$n)
test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) tests

# the same without the tests marked slow (whole training runs): a quick local check; CI runs `test`
test-quick: install
	$(PYTHON) -m pytest -q -m "not slow" tests

bench: install
	$(PYTHON) benchmarks/run.py

# A wheel holding the compiled CPU and CUDA kernels, built against the installed torch (its
# version tag and requirement say which: 0.1.0+torch2.14cu130 needs torch 2.14.*).
WHEEL_ARCHS ?= 8.0;9.0;10.0+PTX
wheel: deps
	rm -rf dist
	TORCH_CUDA_ARCH_LIST="$(WHEEL_ARCHS)" $(PIP) wheel -q --no-build-isolation --no-deps -w dist .

# The wheel in a fresh virtual environment holding only the same torch (and numpy), installed
# with no compiler on PATH, then the smoke test run from outside the checkout.
SMOKE_VENV ?= build/smoke-venv
smoke-wheel:
	rm -rf $(SMOKE_VENV)
	$(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_VENV)/bin/python -m pip install -q "torch==$$($(PYTHON) -c 'import torch; print(torch.__version__.split("+")[0])')"
	env PATH="$(abspath $(SMOKE_VENV))/bin" /bin/sh -c '! command -v gcc && ! command -v nvcc && \
	  python -m pip install -q dist/*.whl'
	cd /tmp && $(abspath $(SMOKE_VENV))/bin/python $(abspath tests/smoke_installed.py)

clean:
	rm -rf build dist *.egg-info rlhf_kernels/_C*.so rlhf_kernels/_build_info.json

# Wheels of the comparison libraries for an offline GPU machine running
# benchmarks/gpu_check.sh (pure Python; torch and triton come from that machine).
ANCHOR_PY ?= 3.12
anchor-wheels:
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(ANCHOR_PY) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl liger-kernel cut-cross-entropy
