"""Shared pieces of the integration tests (no tests here): importing the libraries or skipping
with the reason, inputs, and the one comparison rule.

The comparison rule (rlhf_kernels/tolerances.py, DESIGN.md): the library's own function run on the
float64-upcast inputs is the reference. Ours must be within the op's tolerance of it plus the
rounding of our output dtype, or no worse than twice the library's own error in the input
dtype, whichever is larger. With float32 inputs the library's error is tiny, so this is "ours
equals the library's within the tolerance"; where the library computes in bfloat16, or
cancels (k3 as exp(x) - x - 1, a variance as sum2 - sum^2/n), ours is held to float64 instead.
"""

import ast
import importlib
import importlib.util
import os
import sys
import types
import typing

import pytest
import torch

from rlhf_kernels import tolerances as tol
from tests._helpers import log_ratio_inputs

FACTOR = tol.GRAD_TORCH_ERR_FACTOR  # "no worse than twice the library's own error"
# The replacements on both devices; conftest skips the `cuda` ones without a GPU. On a GPU the
# libraries take their GPU paths too (TRL's Triton kernel, returning float32).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def require(module):
    """Import ``module`` or skip the test, saying why (tests/install_integrations.sh installs them)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken dependency raising something else at import
        pytest.skip("%s does not import here (%s: %s); tests/install_integrations.sh installs it"
                    % (module, type(e).__name__, e), allow_module_level=True)


def load_openrlhf():
    """(openrlhf.models.utils, openrlhf.models.loss) of the installed OpenRLHF.

    OpenRLHF's openrlhf/models/__init__.py imports its actor and model code, which need
    flash-attn (a CUDA build) and DeepSpeed. The two modules holding the functions we replace
    are pure PyTorch; when the package does not import, they are loaded from the installed
    files under their own names, below a bare ``openrlhf.models`` package. utils.py imports
    deepspeed but uses it only in set_z3_leaf_modules: without DeepSpeed, a stub module stands
    in while utils.py executes (and is removed from sys.modules afterwards)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.skip("openrlhf is not installed; tests/install_integrations.sh installs it", allow_module_level=True)
    try:
        import openrlhf.models.loss
        import openrlhf.models.utils
        return openrlhf.models.utils, openrlhf.models.loss
    except ImportError:
        pass
    if "openrlhf.models.loss" in sys.modules and "openrlhf.models.utils" in sys.modules:
        return sys.modules["openrlhf.models.utils"], sys.modules["openrlhf.models.loss"]
    folder = os.path.join(os.path.dirname(spec.origin), "models")
    package = types.ModuleType("openrlhf.models")
    package.__path__ = [folder]
    sys.modules["openrlhf.models"] = package
    stub = importlib.util.find_spec("deepspeed") is None
    if stub:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        loaded = []
        for name in ("utils", "loss"):
            full = "openrlhf.models." + name
            mspec = importlib.util.spec_from_file_location(full, os.path.join(folder, name + ".py"))
            module = importlib.util.module_from_spec(mspec)
            sys.modules[full] = module
            mspec.loader.exec_module(module)
            setattr(package, name, module)
            loaded.append(module)
    finally:
        if stub:
            del sys.modules["deepspeed"]
    return tuple(loaded)


def lift_method(module_name, class_name, method_name):
    """The library's own method, compiled alone from the installed source file, for a method
    whose module does not import here (OpenRLHF's experience maker imports Ray actors,
    DeepSpeed and flash-attn). Only the method's own code runs: torch and typing in scope."""
    top, *parts = module_name.split(".")
    spec = importlib.util.find_spec(top)  # not the module's own: that would import its packages
    if spec is None:
        pytest.skip("%s is not installed" % top, allow_module_level=True)
    path = os.path.join(os.path.dirname(spec.origin), *parts) + ".py"
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method_name:
                    namespace = {"torch": torch, **{k: getattr(typing, k) for k in ("List", "Tuple", "Optional",
                                                                                     "Union")}}
                    exec(compile(ast.Module(body=[item], type_ignores=[]), path, "exec"), namespace)
                    return namespace[method_name]
    pytest.fail("%s.%s.%s not found in %s" % (module_name, class_name, method_name, path))


# ---- inputs --------------------------------------------------------------------------------

def mask_with_gaps(gen, B, T, dtype=torch.int64):
    """[B, T] 0/1 mask: right padding of random length, holes inside, one row fully masked
    (when B > 2), at least two valid entries overall."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    m = torch.arange(T)[None, :] < lengths[:, None]
    m &= torch.rand(B, T, generator=gen) > 0.15
    if B > 2:
        m[1] = False
    m[0, :2] = True
    return m.to(dtype)


def policy_inputs(gen, B=6, T=20, dtype=torch.float32, mask_dtype=torch.int64, device="cpu"):
    """(old_logp, logp, advantages, mask) [B, T] for the policy losses: the kit's log-ratio draws
    (tests/_helpers.py) with old_logp the base, in (-4, 0], and logp within about 0.3 of it; three
    log-ratios of row 0 beyond the libraries' +-20 clamp, with advantages of both signs there."""
    old, lp, adv = log_ratio_inputs(gen, B, T, spread=4.0, noise=0.3, adv_scale=1.0)
    lp[0, :3] = old[0, :3] + torch.tensor([25.0, -25.0, 21.0])  # beyond the +-20 clamp of the log ratio
    adv[0, :3] = torch.tensor([-1.0, 1.5, 2.0])
    return tuple(t.to(device) for t in (old.to(dtype), lp.to(dtype), adv.to(dtype),
                                        mask_with_gaps(gen, B, T, mask_dtype)))


def logits(gen, shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def grad_of(fn, *inputs, grad_out=None):
    """(output, grads of sum(output * grad_out) wrt ``inputs``), on fresh leaf copies."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    first = out[0] if isinstance(out, tuple) else out
    g = torch.ones_like(first) if grad_out is None else grad_out.to(first.dtype)
    grads = torch.autograd.grad((first * g).sum(), leaves, allow_unused=True)
    return out, [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads)]


def up(x):
    """float64 copy of a float tensor (anything else as it is)."""
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


# ---- the comparison rule ---------------------------------------------------------------------

def assert_close(ours, lib, ref, atol, rtol=0.0, what="output", ulps=tol.LOGPROB_OUTPUT_ULPS):
    """|ours - ref| <= atol + rtol |ref| + ulps * eps(ours.dtype) |ref| + FACTOR |lib - ref|,
    elementwise (ref: the library's function in float64). Same shape and dtype as ``lib``."""
    assert ours.shape == lib.shape, "%s: shape %s, the library's %s" % (what, ours.shape, lib.shape)
    assert ours.dtype == lib.dtype, "%s: dtype %s, the library's %s" % (what, ours.dtype, lib.dtype)
    o, l, r = ours.double(), lib.double(), ref.double()
    finite = torch.isfinite(r)
    assert torch.equal(torch.isfinite(o), finite), "%s: non-finite entries differ from float64" % what
    bound = atol + rtol * r.abs() + ulps * torch.finfo(ours.dtype).eps * r.abs() + FACTOR * (l - r).abs()
    err = torch.where(finite, (o - r).abs(), 0.0)
    bad = err > torch.where(finite, bound, 0.0)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0, 0])
        raise AssertionError("%s: %d entries off; e.g. flat %d: ours %.9g, library %.9g, float64 %.9g (bound %.3g)"
                             % (what, int(bad.sum()), i, o.reshape(-1)[i], l.reshape(-1)[i], r.reshape(-1)[i],
                                bound.reshape(-1)[i]))


def assert_grads_close(ours, lib, ref, what="grad"):
    """Gradients: relative to their own size plus a fraction of the largest, as tests/test_ppo.py,
    and the low-precision rule of assert_close."""
    for i, (o, l, r) in enumerate(zip(ours, lib, ref)):
        scale = float(r.double().abs().max()) if r.numel() else 0.0
        assert_close(o, l, r, atol=tol.GRAD_ATOL_FRAC * scale + 1e-12, rtol=tol.GRAD_RTOL, what="%s[%d]" % (what, i),
                     ulps=tol.GRAD_ULPS)


def assert_matmul_grads_close(ours, lib, ref, what="grad"):
    """Gradients of a fused LM head (a matmul over V in the backward): elementwise as
    assert_grads_close in float32; in a low-precision dtype tensor-wide, as
    tests/test_linear_logprobs.py holds linear_token_logprobs: the largest error no worse than
    twice the library's own largest error plus a few ulps of the largest entry (an entry that a
    bf16 matmul gets by cancellation has no elementwise bound)."""
    for i, (o, l, r) in enumerate(zip(ours, lib, ref)):
        if o.dtype == torch.float32:
            assert_grads_close([o], [l], [r], what="%s[%d]" % (what, i))
            continue
        assert o.shape == l.shape and o.dtype == l.dtype, "%s[%d]: %s %s vs %s %s" % (what, i, o.shape, o.dtype,
                                                                                    l.shape, l.dtype)
        r64 = r.double()
        err, lib_err = (o.double() - r64).abs().max().item(), (l.double() - r64).abs().max().item()
        bound = FACTOR * lib_err + tol.GRAD_ULPS * torch.finfo(o.dtype).eps * r64.abs().max().item()
        assert err <= bound, "%s[%d]: largest error %.3g, bound %.3g (the library's %.3g)" % (what, i, err, bound,
                                                                                           lib_err)
