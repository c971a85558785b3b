"""Test setup shared by every family.

Without a GPU the Triton kernels run under the interpreter on CPU tensors; the
variable must be set before any Triton kernel module is imported (they are imported
lazily by the public API, so setting it here is early enough).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rlhf_kernels  # noqa: E402
from rlhf_kernels import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def device_backends():
    """(device, backend) pairs runnable here; CUDA ones carry the `cuda` mark."""
    params = [pytest.param("cpu", b, id="cpu-" + b) for b in _backend.available("cpu")]
    if HAS_CUDA:
        params += [pytest.param("cuda", b, id="cuda-" + b, marks=pytest.mark.cuda)
                   for b in _backend.available("cuda")]
    return params


def native_devices():
    """Devices whose native backend (cpu, cuda) is usable here; CUDA carries the `cuda` mark."""
    return [pytest.param(p.values[0], id=p.values[0], marks=p.marks) for p in device_backends()
            if p.values[1] in ("cpu", "cuda")]


needs_native = pytest.mark.skipif("cpu" not in _backend.available("cpu"), reason="native extension not built")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_empty():
    """Every torch.empty (also inside the C++ kernels) comes back filled with NaN, so an
    output element a kernel forgets to write shows up. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("poison_empty")``."""
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def gen():
    """A fresh random generator per test, seeded from the test's name: fresh inputs for
    every case, reproducible failures."""
    import zlib
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    return torch.Generator().manual_seed(seed)
