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


NO_TRITON = "triton is not installed (a CPU-only torch brings none; `pip install triton` to test that backend)"


def device_backends():
    """(device, backend) pairs runnable here; CUDA ones carry the `cuda` mark. Without triton
    the triton pairs are still listed, skipped with the reason, so a run says what it left out."""
    params = [pytest.param("cpu", b, id="cpu-" + b) for b in _backend.available("cpu")]
    if HAS_CUDA:
        params += [pytest.param("cuda", b, id="cuda-" + b, marks=pytest.mark.cuda)
                   for b in _backend.available("cuda")]
    if not _backend.triton_installed():
        params += [pytest.param(d, "triton", id=d + "-triton", marks=pytest.mark.skip(reason=NO_TRITON))
                   for d in ("cpu", "cuda") if d == "cpu" or HAS_CUDA]
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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module's tests, the count restored after: the trainer's
    models are tiny, so one thread is as fast, and on a busy machine far faster. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gen():
    """A fresh random generator per test, seeded from the test's name: fresh inputs for
    every case, reproducible failures."""
    import zlib
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    return torch.Generator().manual_seed(seed)


def replay_twice(make, step, check):
    """Capture ``step(*static)`` in a CUDA graph after a warm-up on a side stream; then twice: copy
    fresh inputs into the static ones, replay, check the replay bitwise against eager, and call
    ``check(fresh, outs)`` (e.g. against the float64 reference)."""
    static = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(*static)
    for _ in range(2):
        fresh = make()
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        for i, (o, e) in enumerate(zip(outs, step(*fresh))):
            assert torch.equal(o, e), "replay: output %d differs from the eager value" % i
        check(fresh, outs)
