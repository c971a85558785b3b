"""logprobs family: token_logprobs, token_entropy, full_kl, kl_penalty.

Every backend is compared with the eager reference evaluated in float64 on the same
(upcast) inputs. Forward: within LOGPROB_ATOL. Gradients: no worse than twice PyTorch's
own error in that dtype (the reference run in the low dtype), plus a few ulps of the output.
"""

import pytest
import torch

import rlhf_kernels as rk
import tolerances as tol
from conftest import device_backends, native_devices, needs_native
from rlhf_kernels.reference import logprobs as ref

BACKENDS = device_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def _skip_unsupported(device, backend, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do bfloat16 arithmetic")


def _logits(gen, shape, dtype, device, scale=3.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def _labels(gen, lead, V, device, ignore_frac=0.25, dtype=torch.int64):
    y = torch.randint(0, V, lead, generator=gen)
    y[torch.rand(lead, generator=gen) < ignore_frac] = IGNORE
    return y.to(dtype).to(device)


def _upstream(gen, lead, device):
    return torch.randn(lead, generator=gen, dtype=torch.float64).to(device)


def _maxerr(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close_f32(ours, exact, atol=None):
    """|ours - exact| <= atol + a couple of float32 ulps of exact, elementwise."""
    atol = tol.LOGPROB_ATOL if atol is None else atol
    err = (ours.double() - exact).abs()
    bound = atol + tol.LOGPROB_OUTPUT_ULPS * torch.finfo(torch.float32).eps * exact.abs()
    assert (err <= bound).all(), (err - bound).max().item()


def _grad_bound(g_low, g64, dtype):
    """Twice PyTorch's own error in ``dtype``, plus a few ulps of the largest gradient entry."""
    own = _maxerr(g_low, g64)
    return tol.GRAD_TORCH_ERR_FACTOR * own + tol.GRAD_ULPS * torch.finfo(dtype).eps * g64.abs().max().item()


def _logprob_grads(fn, x, y, a, b):
    """d/dx of sum(a * logp + b * entropy) for ``fn(x) -> (logp, entropy)``."""
    xx = x.detach().clone().requires_grad_(True)
    logp, ent = fn(xx, y)
    ((logp.double() * a).sum() + (ent.double() * b).sum()).backward()
    return logp.detach(), ent.detach(), xx.grad


def _check_token_logprobs(device, backend, x, y, temperature=1.0, grads=True):
    gen = torch.Generator().manual_seed(int(x.numel()) + 1)
    a, b = _upstream(gen, y.shape, device), _upstream(gen, y.shape, device)

    def ours(xx, yy):
        return rk.token_logprobs(xx, yy, temperature=temperature, return_entropy=True, backend=backend)

    def theirs(xx, yy):
        return ref.token_logprobs(xx, yy, temperature, IGNORE)

    logp, ent, g = _logprob_grads(ours, x, y, a, b) if grads else (*ours(x, y), None)
    logp64, ent64, g64 = _logprob_grads(theirs, x.double(), y, a, b)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == y.shape and ent.shape == y.shape
    _assert_close_f32(logp, logp64)
    _assert_close_f32(ent, ent64)
    ignored = y == IGNORE
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    if grads:
        assert g.dtype == x.dtype and g.shape == x.shape
        assert (g[ignored] == 0).all()
        g_low = _logprob_grads(theirs, x, y, a, b)[2]  # PyTorch's own result in x's dtype
        err, bound = _maxerr(g, g64), _grad_bound(g_low, g64, x.dtype)
        assert err <= bound, (err, bound)
    return logp, ent, g


# ---- token_logprobs: values and gradients ----

@pytest.mark.parametrize("V", [1, 131, 2048, 2065])  # 2048: the vectorized CUDA path; 2065: no block divides it
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_token_logprobs_matches_float64(gen, device, backend, dtype, V):
    _skip_unsupported(device, backend, dtype)
    x = _logits(gen, (2, 3, V), dtype, device)
    y = _labels(gen, (2, 3), V, device)
    logp, ent, _ = _check_token_logprobs(device, backend, x, y)
    again = rk.token_logprobs(x, y, return_entropy=True, backend=backend)
    assert torch.equal(again[0], logp) and torch.equal(again[1], ent)  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_temperature_int32_labels_noncontiguous(gen, device, backend, dtype):
    V = 257
    big = _logits(gen, (5, 2 * V), dtype, device)
    x = big[:, ::2]  # non-contiguous view [5, V]
    assert not x.is_contiguous()
    y = _labels(gen, (10,), V, device, dtype=torch.int32)[::2]
    before = big.clone()
    _check_token_logprobs(device, backend, x, y, temperature=0.7)
    assert torch.equal(big, before)  # the caller's logits are never modified


@pytest.mark.parametrize("V", [152064, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if tuple(p.values) != ("cpu", "triton")])
def test_large_vocab(gen, device, backend, dtype, V):
    x = _logits(gen, (2, V), dtype, device)
    y = _labels(gen, (2,), V, device, ignore_frac=0.0)
    logp, ent = rk.token_logprobs(x, y, return_entropy=True, backend=backend)
    logp64, ent64 = ref.token_logprobs(x.double(), y, 1.0, IGNORE)
    logp32, ent32 = ref.token_logprobs(x.float(), y, 1.0, IGNORE)  # PyTorch's own float32 error
    for ours, exact, own in ((logp, logp64, logp32), (ent, ent64, ent32)):
        _assert_close_f32(ours, exact, max(tol.LOGPROB_ATOL, tol.LOGPROB_TORCH_ERR_FACTOR * _maxerr(own, exact)))


@pytest.mark.parametrize("case", ["label_near_one", "all_negative", "neg_inf", "magnitude_1e4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_adversarial(gen, device, backend, dtype, case):
    _skip_unsupported(device, backend, dtype)
    V, lead = 389, (6,)
    x = torch.randn(lead + (V,), generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, lead, generator=gen)
    rows = torch.arange(lead[0])
    if case == "label_near_one":
        x[rows, y] += 30.0  # softmax of the label is 1 - O(1e-11)
    elif case == "all_negative":
        x = -(x.abs() * 3 + 50)
    elif case == "neg_inf":
        x[torch.rand(x.shape, generator=gen) < 0.3] = float("-inf")
        x[0, :] = float("-inf")  # one row with a single finite entry
        x[0, 7] = 1.5
        y[0] = 7
        x[rows, y] = x[rows, y].clamp_min(-1.0)  # the label itself is finite
    else:  # rows near +-1e4 (lse cancels against the label's logit), and rows spread over +-3e4
        x[:3] += torch.tensor([1e4, -1e4, 1e4], dtype=torch.float64).unsqueeze(1)
        x[3:] *= 1e4
    if dtype == torch.float16 and case == "magnitude_1e4":
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype).to(device)
    y = y.to(device)
    _check_token_logprobs(device, backend, x, y)


# ---- token_entropy and full_kl ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_token_entropy(gen, device, backend, dtype):
    _skip_unsupported(device, backend, dtype)
    V = 1031
    x = _logits(gen, (3, 2, V), dtype, device)
    x[0, 0, :100] = float("-inf")
    g_up = _upstream(gen, (3, 2), device)
    xx = x.clone().requires_grad_(True)
    h = rk.token_entropy(xx, temperature=1.3, backend=backend)
    (h.double() * g_up).sum().backward()
    x64 = x.double().requires_grad_(True)
    h64 = ref.token_entropy(x64, 1.3)
    (h64 * g_up).sum().backward()
    xl = x.clone().requires_grad_(True)
    (ref.token_entropy(xl, 1.3).double() * g_up).sum().backward()
    assert h.dtype == torch.float32 and h.shape == (3, 2)
    _assert_close_f32(h, h64)
    assert _maxerr(xx.grad, x64.grad) <= _grad_bound(xl.grad, x64.grad, dtype)


@pytest.mark.parametrize("V", [1, 131, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_full_kl(gen, device, backend, dtype, V):
    _skip_unsupported(device, backend, dtype)
    lead = (4, 2)
    x = _logits(gen, lead + (V,), dtype, device)
    noise = _logits(gen, lead + (V,), torch.float64, device, scale=1.0)
    r64 = x.double() + noise * torch.tensor([0.01, 1.0, 5.0, 0.0], dtype=torch.float64).view(4, 1, 1)
    r = r64.to(dtype)
    if V > 1:
        r[1, 1, : V // 2] = float("-inf")  # q = 0 where p > 0: KL = inf
        x[2, 0, : V // 2] = float("-inf")  # p = 0 there: those terms count 0
    g_up = _upstream(gen, lead, device)
    g_up[1, 1] = 0.0  # the infinite KL gets no gradient
    xx = x.clone().requires_grad_(True)
    kl = rk.full_kl(xx, r, temperature=0.9, backend=backend)
    (kl.double() * g_up).sum().backward()
    x64 = x.double().requires_grad_(True)
    kl64 = ref.full_kl(x64, r.double(), 0.9)
    (kl64 * g_up).sum().backward()
    xl = x.clone().requires_grad_(True)
    (ref.full_kl(xl, r, 0.9).double() * g_up).sum().backward()
    assert kl.dtype == torch.float32 and kl.shape == lead
    finite = torch.isfinite(kl64)
    assert torch.equal(torch.isfinite(kl), finite)
    _assert_close_f32(kl[finite], kl64[finite])
    ok = finite.unsqueeze(-1).expand_as(x)
    assert _maxerr(xx.grad[ok], x64.grad[ok]) <= _grad_bound(xl.grad[ok], x64.grad[ok], dtype)
    if V > 1:
        assert torch.equal(kl[3], torch.zeros_like(kl[3]))  # identical rows: exactly 0


# ---- kl_penalty ----

@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_penalty(gen, kind, clamp):
    lp = -torch.rand(64, generator=gen, dtype=torch.float64) * 3
    lr = lp + torch.randn(64, generator=gen, dtype=torch.float64) * 0.7
    lr[:4] = lp[:4] + 1e-4  # small log-ratios, where k3 cancels
    a = lp.float().requires_grad_(True)
    b = lr.float().requires_grad_(True)
    out = rk.kl_penalty(a, b, kind, clamp=clamp)
    g = torch.randn(64, generator=gen, dtype=torch.float64)
    (out.double() * g).sum().backward()
    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    out64 = ref.kl_penalty(a64, b64, kind, clamp)
    (out64 * g).sum().backward()
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), out64, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)
    if kind == "k3":
        assert (out[:4] > 0).all()  # exp(-x) - 1 + x > 0 for x != 0, even for tiny x


def test_kl_penalty_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="kind"):
        rk.kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        rk.kl_penalty(x, torch.zeros(4), "k1")
    with pytest.raises(ValueError, match="clamp"):
        rk.kl_penalty(x, x, "k1", clamp=-1.0)


# ---- memory, robustness, bad input ----

@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_inplace_backward(gen, device, backend):
    V = 300
    x = _logits(gen, (4, V), torch.float32, device)
    y = _labels(gen, (4,), V, device)
    a, b = _upstream(gen, (4,), device), _upstream(gen, (4,), device)

    def grads(inplace):
        leaf = x.clone().requires_grad_(True)
        h = leaf * 1.0  # the buffer the backward may overwrite
        logp, ent = rk.token_logprobs(h, y, return_entropy=True, inplace_backward=inplace, backend=backend)
        ((logp.double() * a).sum() + (ent.double() * b).sum()).backward()
        return leaf.grad, h.detach()

    g_new, h_new = grads(False)
    g_in, h_in = grads(True)
    assert torch.equal(g_new, g_in)
    assert torch.equal(h_new, x)  # untouched without inplace_backward
    assert torch.equal(h_in, g_in)  # with it, the logits buffer now holds the gradient


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_stays_in_its_row(gen, device, backend):
    V = 200
    x = _logits(gen, (4, V), torch.float32, device)
    x[1, 17] = float("nan")
    y = _labels(gen, (4,), V, device, ignore_frac=0.0)
    xx = x.clone().requires_grad_(True)
    logp, ent = rk.token_logprobs(xx, y, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    kl = rk.full_kl(x, x.flip(0), backend=backend)
    clean = torch.tensor([0, 2, 3])
    logp64, ent64 = ref.token_logprobs(x[clean].double(), y[clean], 1.0, IGNORE)
    _assert_close_f32(logp[clean], logp64)
    _assert_close_f32(ent[clean], ent64)
    assert torch.isfinite(xx.grad[clean]).all()
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(kl[[0, 3]]).all() and torch.isnan(kl[[1, 2]]).all()  # row 2 is compared with row 1


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty(device, backend):
    x = torch.randn(0, 5, 11, device=device).requires_grad_(True)
    y = torch.zeros(0, 5, dtype=torch.long, device=device)
    logp, ent = rk.token_logprobs(x, y, return_entropy=True, backend=backend)
    assert logp.shape == (0, 5) and ent.shape == (0, 5)
    (logp.sum() + ent.sum() + rk.full_kl(x, x.detach(), backend=backend).sum()).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_input(device, backend):
    x = torch.randn(2, 3, 10, device=device)
    y = torch.randint(0, 10, (2, 3), device=device)
    for bad_value in (10, -1, 1 << 40):
        yb = y.clone()
        yb[1, 2] = bad_value
        with pytest.raises((ValueError, RuntimeError), match="labels"):
            rk.token_logprobs(x, yb, backend=backend)
    with pytest.raises(ValueError, match="V = 0"):
        rk.token_logprobs(torch.randn(2, 0, device=device), torch.zeros(2, dtype=torch.long, device=device),
                          backend=backend)
    with pytest.raises(ValueError, match="V = 0"):
        rk.token_entropy(torch.randn(2, 0, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"labels.*\(2, 3\)"):
        rk.token_logprobs(x, y[:, :2], backend=backend)
    with pytest.raises(TypeError, match="labels"):
        rk.token_logprobs(x, y.float(), backend=backend)
    with pytest.raises(ValueError, match="device"):
        rk.token_logprobs(x, y.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        rk.token_logprobs(x, y, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="ref_logits"):
        rk.full_kl(x, x[:, :2], backend=backend)
    with pytest.raises(TypeError, match="ref_logits"):
        rk.full_kl(x, x.double(), backend=backend)


def test_explicit_backend_rejects_float64():
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(rk.BackendUnavailable, match="float64"):
        rk.token_entropy(x, backend="cpu")
    h = rk.token_entropy(x)  # auto falls back to the torch reference
    assert h.dtype == torch.float32


# ---- torch.library registration: opcheck and torch.compile ----

NATIVE_DEVICES = native_devices()


@needs_native
@pytest.mark.parametrize("device", NATIVE_DEVICES)
def test_opcheck_every_op(gen, device):
    ops = torch.ops.rlhf_kernels
    N, V = 5, 64  # 64: the CUDA kernels take their vectorized path
    for dtype, ldtype in ((torch.float32, torch.int64), (torch.bfloat16, torch.int32)):
        x = _logits(gen, (N, V), dtype, device).requires_grad_(True)
        xr = _logits(gen, (N, V), dtype, device)
        y = _labels(gen, (N,), V, device, dtype=ldtype)
        torch.library.opcheck(ops.token_logprobs_fwd, (x, y, 0.8, IGNORE))
        torch.library.opcheck(ops.token_entropy_fwd, (x, 1.2))
        torch.library.opcheck(ops.full_kl_fwd, (x, xr, 0.8))
        xd = x.detach()
        _, ent, stats = ops.token_logprobs_fwd(xd, y, 0.8, IGNORE)
        gl, gh = torch.randn(N, generator=gen).to(device), torch.randn(N, generator=gen).to(device)
        torch.library.opcheck(ops.logprobs_bwd, (xd, y, gl, gh, stats, ent, 0.8, IGNORE))
        torch.library.opcheck(ops.logprobs_bwd, (xd, None, None, gh, stats, ent, 0.8, IGNORE))
        torch.library.opcheck(ops.logprobs_bwd_inplace, (xd.clone(), y, gl, None, stats, ent, 0.8, IGNORE))
        kl, kstats = ops.full_kl_fwd(xd, xr, 0.8)
        torch.library.opcheck(ops.full_kl_bwd, (gl, xd, xr, kl, kstats, 0.8))


@needs_native
def test_torch_compile_fullgraph(gen):
    V = 97
    x = _logits(gen, (3, 4, V), torch.float32, "cpu")
    xr = _logits(gen, (3, 4, V), torch.float32, "cpu")
    y = _labels(gen, (3, 4), V, "cpu")

    def f(x, xr, y):
        logp, ent = rk.token_logprobs(x, y, temperature=0.9, return_entropy=True, backend="cpu")
        h = rk.token_entropy(x, backend="cpu")
        kl = rk.full_kl(x, xr, backend="cpu")
        k3 = rk.kl_penalty(logp, logp.detach() * 0.9, "k3")
        return logp.sum() + ent.sum() + h.sum() + kl.sum() + k3.sum()

    compiled = torch.compile(f, fullgraph=True)  # inductor: fake kernels, autograd, and codegen around the ops
    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    out_e, out_c = f(xe, xr, y), compiled(xc, xr, y)
    out_e.backward()
    out_c.backward()
    assert torch.allclose(out_e, out_c, rtol=1e-6, atol=1e-5)
    assert torch.allclose(xe.grad, xc.grad, rtol=1e-5, atol=1e-7)
