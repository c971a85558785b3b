"""The build, the import and the backend dispatch, as a user meets them."""

import json
import os
import subprocess
import sys

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend, _ext, _signatures
from rlhf_kernels._schemas import SCHEMAS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT,
                          timeout=300)


def test_import_touches_no_gpu_and_no_triton():
    p = run_python(
        "import sys, torch, rlhf_kernels as rk\n"
        "x = torch.randn(2, 5); m = torch.ones(2, 5, dtype=torch.bool)\n"
        "rk.gae(x, x, m)\n"
        "print('triton' in sys.modules, torch.cuda.is_initialized())\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "False"]


def test_import_without_extension_falls_back_to_torch():
    """A missing or broken native module is a warning, never a crash; `auto` then uses
    torch, and an explicit native backend says why it cannot serve."""
    p = run_python(
        "import sys, warnings\n"
        "sys.modules['rlhf_kernels._C'] = None  # makes `import rlhf_kernels._C` fail\n"
        "import torch, rlhf_kernels as rk\n"
        "x = torch.randn(2, 5); m = torch.ones(2, 5, dtype=torch.bool)\n"
        "a, r = rk.gae(x, x, m)\n"
        "print(rk.available_backends('cpu'))\n"
        "try:\n"
        "    rk.gae(x, x, m, backend='cpu')\n"
        "except rk.BackendUnavailable as e:\n"
        "    print('ERR', e)\n")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert "'cpu'" not in lines[0] and "'torch'" in lines[0]
    assert lines[1].startswith("ERR gae: backend 'cpu' cannot serve this call: the native extension is")


def test_binary_for_another_torch_is_not_loaded():
    """A build for another torch minor version (a wheel beside the wrong torch) is refused
    before its binary is loaded: a warning, then the torch (and triton) backends serve."""
    if not _ext.loaded():
        pytest.skip("native extension not built")
    p = run_python(
        "import sys, warnings, torch\n"
        "torch.__version__ = '2.99.0'\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import rlhf_kernels as rk\n"
        "x = torch.randn(2, 5); m = torch.ones(2, 5, dtype=torch.bool)\n"
        "rk.gae(x, x, m)\n"
        "print('rlhf_kernels._C' in sys.modules, rk.available_backends('cpu'))\n"
        "print([str(i.message) for i in w if 'native extension' in str(i.message)][0])\n")
    assert p.returncode == 0, p.stderr
    first, warning = p.stdout.strip().splitlines()
    assert first.startswith("False") and "'cpu'" not in first and "'torch'" in first
    assert "but torch 2.99.0 is running; it is not loaded" in warning


def test_info_reports_the_build():
    p = run_python("import runpy; runpy.run_module('rlhf_kernels.info', run_name='__main__')")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "torch         %s" % torch.__version__ in out
    if _ext.loaded():
        built = ["cpu"] + (["cuda"] if _ext.cuda_built() else [])
        assert "compiled backends: %s" % ", ".join(built) in out
    usable = set(out.split("cpu tensors:")[1].splitlines()[0].replace(",", " ").split())
    assert {"cpu", "torch"} <= usable if _ext.loaded() else "torch" in usable and "cpu" not in usable
    if not _backend.triton_installed():  # as with a CPU-only torch, which brings no triton
        assert "triton        not installed" in out
        assert "not triton: triton is not installed" in out


def test_build_record_matches_binary():
    """setup.py's record and the binary agree, and the binary was built for this torch."""
    if not _ext.loaded():
        pytest.skip("native extension not built")
    with open(os.path.join(os.path.dirname(rk.__file__), "_build_info.json")) as f:
        record = json.load(f)
    binary = _ext.C.build_info()
    assert record["cuda"] == binary["cuda"]
    assert binary["torch"] == torch.__version__.split("+")[0]
    if record["cuda"]:
        # the toolkit was found from nvcc itself, not guessed from its PATH entry
        assert os.path.exists(os.path.join(record["cuda_home"], "bin", "nvcc"))
        assert "8.0" in " ".join(record["cuda_archs"]) and "9.0" in " ".join(record["cuda_archs"])


@pytest.mark.skipif(os.environ.get("CI") != "true" and not _ext.cuda_built(),
                    reason="the CUDA kernels are only required where nvcc is installed (CI has it)")
def test_ci_builds_cuda_kernels():
    assert _ext.cuda_built(), "CI has nvcc: the CUDA kernels must be compiled (%s)" % _ext.BUILD.get("cuda_reason")


def test_auto_resolution():
    expected_cpu = "cpu" if _ext.loaded() else "torch"
    assert _backend.resolve("auto", "cpu") == expected_cpu
    cuda_order = [b for b in ("cuda", "triton", "torch") if _backend.why_not(b, "cuda") is None]
    assert _backend.resolve("auto", "cuda") == cuda_order[0]


def test_available_backends_answer_for_this_machine():
    """Without a visible GPU no backend serves CUDA tensors but torch, whatever was compiled."""
    cuda = rk.available_backends("cuda")
    if torch.cuda.is_available():
        assert ("cuda" in cuda) == _ext.cuda_built()
    else:
        assert cuda == ["torch"]
        if _ext.cuda_built():
            assert _backend.why_not("cuda", "cuda") == "no GPU is visible"
        if _backend.triton_installed():
            assert _backend.why_not("triton", "cuda") == "no GPU is visible"
        else:
            assert _backend.why_not("triton", "cuda") == "triton is not installed"
            assert "triton" not in rk.available_backends("cpu")


@pytest.fixture
def fresh_env(monkeypatch):
    """The environment is read at import: re-read it after changing it, and after the test."""
    yield monkeypatch
    monkeypatch.undo()
    _backend.refresh()


def test_env_var_replaces_auto(fresh_env):
    fresh_env.setenv("RLHF_KERNELS_BACKEND", "torch")
    _backend.refresh()
    assert _backend.resolve("auto", "cpu") == "torch"
    assert _backend.resolve("cpu" if _ext.loaded() else "torch", "cpu") in ("cpu", "torch")  # explicit wins
    x = torch.ones(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    assert _backend.pick("auto", x, "gae") == "torch"
    fresh_env.setenv("RLHF_KERNELS_BACKEND", "cuda")
    _backend.refresh()
    with pytest.raises(rk.BackendUnavailable, match="cuda"):
        rk.gae(x, x, m)


def test_explicit_backend_errors_say_why(fresh_env):
    x, m = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(rk.BackendUnavailable, match="cuda backend takes CUDA tensors|built without CUDA|extension"):
        rk.gae(x, x, m, backend="cuda")
    with pytest.raises(rk.BackendUnavailable, match="unknown backend 'fast'"):
        rk.gae(x, x, m, backend="fast")
    with pytest.raises(TypeError, match="`backend` must be a string"):
        rk.gae(x, x, m, backend=3)
    fresh_env.setenv("TRITON_INTERPRET", "0")
    _backend.refresh()
    with pytest.raises(rk.BackendUnavailable, match="triton"):
        rk.gae(x, x, m, backend="triton")


def test_ops_never_ask_the_binary_per_call(monkeypatch):
    """Build facts are read once at import: an op call makes no pybind11 call (that would cost
    time on every call and stop torch.compile from tracing the op)."""
    if not _ext.loaded():
        pytest.skip("native extension not built")

    def boom():
        raise AssertionError("build_info() called during an op call")

    monkeypatch.setattr(_ext.C, "build_info", boom)
    _backend.refresh()  # forget cached backend choices, so that they are made again
    x, m = torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)
    rk.gae(x, x, m)
    rk.ppo_policy_loss(x, x, x, m)
    rk.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    assert "cpu" in rk.available_backends("cpu")


def test_registered_ops_exist():
    """Every op the registry holds (csrc/bindings.cpp's schemas; tests/test_signatures.py checks
    the table against it) has a CPU kernel, a CUDA one in a CUDA build, and a fake kernel."""
    if not _ext.loaded():
        pytest.skip("native extension not built")
    ops = _signatures.registered()
    assert set(ops) == set(SCHEMAS)
    for name in ops:
        full = "rlhf_kernels::" + name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(full, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(full, "Meta"), name  # register_fake's
        if _ext.cuda_built():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(full, "CUDA"), name
