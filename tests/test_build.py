"""The build, the import and the backend dispatch, as a user meets them."""

import json
import os
import subprocess
import sys

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend, _ext

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


def test_env_var_replaces_auto(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "torch")
    assert _backend.resolve("auto", "cpu") == "torch"
    assert _backend.resolve("cpu" if _ext.loaded() else "torch", "cpu") in ("cpu", "torch")  # explicit wins
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")
    with pytest.raises(rk.BackendUnavailable, match="cuda"):
        rk.gae(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2))


def test_explicit_backend_errors_say_why(monkeypatch):
    x, m = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(rk.BackendUnavailable, match="cuda backend takes CUDA tensors|built without CUDA|extension"):
        rk.gae(x, x, m, backend="cuda")
    with pytest.raises(rk.BackendUnavailable, match="unknown backend 'fast'"):
        rk.gae(x, x, m, backend="fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(rk.BackendUnavailable, match="triton"):
        rk.gae(x, x, m, backend="triton")


def test_registered_ops_exist():
    if not _ext.loaded():
        pytest.skip("native extension not built")
    for name in ("gae", "gae_packed", "masked_whiten"):
        assert hasattr(torch.ops.rlhf_kernels, name)
