"""benchmarks/static_sm90.py, the static check of every kernel for sm_90: it reports a
real spill and fails on it unless the kernel is allowed. CI runs the check itself (.ci/run)."""

import os
import shutil

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tests._helpers import load_script  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "static_sm90.py")


static = load_script(SCRIPT, "static_sm90")


def _can_compile_sm90():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return os.path.exists(static.cuobjdump()) or shutil.which("cuobjdump") is not None


needs_sm90 = pytest.mark.skipif(not _can_compile_sm90(), reason="Triton's CUDA backend or cuobjdump missing")


def _hold_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # out = x + 1 over BLOCK float64 values, all held across a barrier: BLOCK / (32 * warps)
    # doubles a thread, two registers each (builtins only: under TRITON_INTERPRET=1 the
    # library's jit functions, tl.sum among them, are interpreter functions and cannot compile)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.debug_barrier()
    tl.store(out_ptr + offs, x + 1.0)


# a JITFunction whatever TRITON_INTERPRET says (tests/conftest.py sets it without a GPU, and then
# triton.jit gives an interpreter function, which cannot be compiled)
_hold = JITFunction(_hold_kernel)


def _measure(block):
    u = static.compile_sm90(_hold, {"x_ptr": "*fp64", "out_ptr": "*fp64", "BLOCK": "constexpr"},
                            {"BLOCK": block}, num_warps=1)
    return dict(kind="triton", kernel="_hold_kernel", config="BLOCK=%d" % block, **u)


@needs_sm90
def test_a_spilling_kernel_fails_the_check():
    small, big = _measure(256), _measure(8192)  # 8 doubles a thread; 256 (512 registers: past 255)
    assert small["spill_ops"] == 0 and small["stack"] == 0 and small["local"] == 0, small
    assert big["spill_ops"] > 0 and big["stack"] > 0, big
    assert static.problems([small, big], allowed={}) == [big]
    assert static.problems([small, big], allowed={"_hold_kernel": "a test"}) == []
    assert "SPILLS" in static.table([small, big])


def test_the_check_reads_stack_local_and_spills_separately():
    row = dict(kind="cuda", kernel="k", config="", regs=40, stack=0, local=0, spill_ops=0)
    assert static.problems([row], allowed={}) == []
    for field in ("stack", "local", "spill_ops"):
        bad = dict(row, **{field: 8})
        assert static.problems([bad], allowed={}) == [bad]
        assert static.problems([bad], allowed={"k": "why"}) == []


def test_write_replaces_only_its_own_section(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nbefore\n")
    monkeypatch.setattr(static, "RESULTS", results)
    static.write_results("table one")
    static.write_results("table two")
    text = results.read_text()
    assert text.startswith("# Results\n\nbefore\n") and "table two" in text and "table one" not in text
    assert text.count(static.BEGIN) == 1 and text.count(static.END) == 1
