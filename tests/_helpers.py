"""The test kit shared by the op families' and the trainer's tests: input makers, comparison
helpers, skip rules and config builders that were copied from file to file (the environment-wide
fixtures and the backend lists live in conftest.py; the integrations' kit in
test_integrations_kit.py)."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from rlhf_kernels.tolerances import GRAD_ATOL_FRAC, GRAD_RTOL, STAT_ATOL, STAT_RTOL

IGNORE = -100  # the ignore_index of the log-prob ops


def skip_unsupported(device, backend, dtype):
    """Skip the case the Triton interpreter cannot run: bfloat16 arithmetic on CPU tensors."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do bfloat16 arithmetic")


def needs_native_cuda_op(op):
    """A skip mark for the tests of the native CUDA kernel of ``rlhf_kernels::<op>``: they run
    only where a GPU is visible and that kernel is registered."""
    try:
        has = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "rlhf_kernels::" + op, "CUDA")
    except RuntimeError:
        has = False
    return pytest.mark.skipif(not has, reason="needs a CUDA GPU and the native CUDA ops")


def make_labels(gen, lead, V, device, ignore_frac=0.25, dtype=torch.int64):
    """Labels of shape ``lead`` in [0, V), about ``ignore_frac`` of them IGNORE."""
    y = torch.randint(0, V, lead, generator=gen)
    y[torch.rand(lead, generator=gen) < ignore_frac] = IGNORE
    return y.to(dtype).to(device)


def maxerr(a, b):
    """max |a - b| in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def make_mask(gen, B, T, p_valid=0.7, padding=None, device="cpu"):
    """A bool mask [B, T] drawn from ``gen``, each entry True with probability ``p_valid``, with the
    fixed rows the tests rely on, set only where the batch holds all of them (a smaller batch
    stays wholly random):

    - row 1 all masked (a row a masked op must leave at zero), in every layout;
    - ``padding="prefix"``: row 2 valid for its first T // 2 tokens, then padding;
    - ``padding="sides"``: row 0 right-padded (its last ceil(T / 3) tokens masked) and row 2
      left-padded (its first T // 2 masked), the rest of both random.
    """
    if padding not in (None, "prefix", "sides"):
        raise ValueError("padding must be None, 'prefix' or 'sides', got %r" % (padding,))
    m = torch.rand(B, T, generator=gen) < p_valid
    if B > (1 if padding is None else 2):
        m[1] = False
        if padding == "prefix":
            m[2, : T // 2] = True
            m[2, T // 2:] = False
        elif padding == "sides":
            m[0, -T // 3:] = False
            m[2, : T // 2] = False
    return m.to(device)


def log_ratio_inputs(gen, B, T, spread=3.0, noise=0.4, adv_scale=2.0, extreme=False):
    """(base, other, advantages), float32 [B, T] on the CPU, drawn from ``gen`` in that order: base
    log-probs in (-spread, 0]; other = base + noise * N(0, 1), or with ``extreme`` base -+ up to 30
    (log-ratios of both signs far beyond any clip); advantages adv_scale * N(0, 1), both signs."""
    base = -spread * torch.rand(B, T, generator=gen)
    if extreme:
        other = base - 30 * (2 * torch.rand(B, T, generator=gen) - 1)
    else:
        other = base + noise * torch.randn(B, T, generator=gen)
    return base, other, adv_scale * torch.randn(B, T, generator=gen)


def policy_inputs(gen, B, T, device="cpu", extreme=False):
    """(logp, old_logp, advantages, mask) [B, T] on ``device`` for the PPO policy loss:
    ``log_ratio_inputs`` with logp the base, and a mask with both kinds of padding (B >= 3)."""
    logp, old, adv = log_ratio_inputs(gen, B, T, extreme=extreme)
    return logp.to(device), old.to(device), adv.to(device), make_mask(gen, B, T, 0.8, "sides", device)


def assert_loss_close(actual, expected, scale, rtol):
    """A float32 0-d loss against its float64 reference: |actual - expected| <= rtol * scale + 1e-12,
    ``scale`` (a number or a 0-d tensor) the size of the terms whose rounding errors it carries."""
    assert actual.dtype == torch.float32 and actual.dim() == 0
    err = abs(actual.double().item() - expected.double().item())
    scale = float(scale)
    assert err <= rtol * scale + 1e-12, (actual.item(), expected.item(), scale)


def assert_grad(actual, expected, dtype=torch.float32):
    """A gradient of ``dtype`` against its float64 reference. float32: GRAD_RTOL relative plus
    GRAD_ATOL_FRAC of the largest entry. A low-precision input gets its gradient rounded once to
    its own dtype (the kernels compute it in float32): one ulp of that dtype relative, or its
    subnormal spacing for gradients that small (float16 gradients of a mean over thousands)."""
    assert actual.dtype == dtype
    fi = torch.finfo(dtype)
    rtol = GRAD_RTOL if dtype == torch.float32 else fi.eps
    atol = GRAD_ATOL_FRAC * expected.abs().max().item() + (1e-30 if dtype == torch.float32 else fi.tiny * fi.eps)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def assert_stats_close(actual, expected):
    """Float32 0-d statistics (a mapping) against the float64 reference's: the same names, each
    within STAT_RTOL and STAT_ATOL."""
    assert set(actual) == set(expected)
    for k in expected:
        assert actual[k].dtype == torch.float32 and actual[k].dim() == 0, k
        torch.testing.assert_close(actual[k].double().cpu(), expected[k].cpu(), rtol=STAT_RTOL, atol=STAT_ATOL,
                                   msg=lambda m: "stat %s: %s" % (k, m))


def tile_fixture(module, tiles, doc):
    """A fixture parametrized over ``tiles`` that sets ``module._TILE`` (the op's working-set
    budget) for the test: 0 is the backend's default; ``doc`` says what the others exercise."""
    @pytest.fixture(params=tiles, ids=lambda t: "tile%d" % t)
    def tile(request, monkeypatch):
        monkeypatch.setattr(module, "_TILE", request.param)
        return request.param
    tile.__doc__ = doc
    return tile


def load_script(path, name):
    """The Python file at ``path`` (a benchmark or an example, not a package module) imported as
    a module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_small(command, out):
    """``python -m rlhf_trainer <command> --small --out <out>`` in a subprocess, which must exit 0:
    (out, its stdout)."""
    p = subprocess.run([sys.executable, "-m", "rlhf_trainer", command, "--small", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def toy_config(algo="ppo", section=None, **keys):
    """The trainer's Config for the toy task: the defaults for ``algo``, with ``section`` merged
    into the algorithm's own section and each of ``keys`` merged in: a dict into the section of
    that name (``task={"stop_at_eos": True}``), anything else as a top-level key (``beta=0.0``)."""
    from rlhf_trainer.config import Config
    d = Config(algo=algo).to_dict()
    for key, value in list(keys.items()) + [(algo, section or {})]:
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key].update(value)
        else:
            d[key] = value
    return Config.from_dict(d)
