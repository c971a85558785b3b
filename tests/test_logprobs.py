"""logprobs family: token_logprobs, token_entropy, full_kl, kl_penalty.

Every backend is compared with the eager reference evaluated in float64 on the same
(upcast) inputs. Forward: within LOGPROB_ATOL. Gradients: no worse than twice PyTorch's
own error in that dtype (the reference run in the low dtype), plus a few ulps of the output.
"""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import tolerances as tol
from conftest import device_backends, native_devices, needs_native
from rlhf_kernels.reference import logprobs as ref
from tests._helpers import IGNORE, make_labels, maxerr, skip_unsupported

BACKENDS = device_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _logits(gen, shape, dtype, device, scale=3.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def _upstream(gen, lead, device):
    return torch.randn(lead, generator=gen, dtype=torch.float64).to(device)


def _assert_close_f32(ours, exact, atol=None):
    """|ours - exact| <= atol + a couple of float32 ulps of exact, elementwise."""
    atol = tol.LOGPROB_ATOL if atol is None else atol
    err = (ours.double() - exact).abs()
    bound = atol + tol.LOGPROB_OUTPUT_ULPS * torch.finfo(torch.float32).eps * exact.abs()
    assert (err <= bound).all(), (err - bound).max().item()


def _grad_bound(g_low, g64, dtype):
    """Twice PyTorch's own error in ``dtype``, plus a few ulps of the largest gradient entry."""
    own = maxerr(g_low, g64)
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
        err, bound = maxerr(g, g64), _grad_bound(g_low, g64, x.dtype)
        assert err <= bound, (err, bound)
    return logp, ent, g


# ---- token_logprobs: values and gradients ----

@pytest.mark.parametrize("V", [1, 131, 2048, 2065])  # 2048: the vectorized CUDA path; 2065: no block divides it
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_token_logprobs_matches_float64(gen, device, backend, dtype, V):
    skip_unsupported(device, backend, dtype)
    x = _logits(gen, (2, 3, V), dtype, device)
    y = make_labels(gen, (2, 3), V, device)
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
    y = make_labels(gen, (10,), V, device, dtype=torch.int32)[::2]
    before = big.clone()
    _check_token_logprobs(device, backend, x, y, temperature=0.7)
    assert torch.equal(big, before)  # the caller's logits are never modified


@pytest.mark.parametrize("V", [152064, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if tuple(p.values) != ("cpu", "triton")])
def test_large_vocab(gen, device, backend, dtype, V):
    x = _logits(gen, (2, V), dtype, device)
    y = make_labels(gen, (2,), V, device, ignore_frac=0.0)
    logp, ent = rk.token_logprobs(x, y, return_entropy=True, backend=backend)
    logp64, ent64 = ref.token_logprobs(x.double(), y, 1.0, IGNORE)
    logp32, ent32 = ref.token_logprobs(x.float(), y, 1.0, IGNORE)  # PyTorch's own float32 error
    for ours, exact, own in ((logp, logp64, logp32), (ent, ent64, ent32)):
        _assert_close_f32(ours, exact, max(tol.LOGPROB_ATOL, tol.LOGPROB_TORCH_ERR_FACTOR * maxerr(own, exact)))


@pytest.mark.parametrize("case", ["label_near_one", "all_negative", "neg_inf", "magnitude_1e4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_adversarial(gen, device, backend, dtype, case):
    skip_unsupported(device, backend, dtype)
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
    skip_unsupported(device, backend, dtype)
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
    assert maxerr(xx.grad, x64.grad) <= _grad_bound(xl.grad, x64.grad, dtype)


@pytest.mark.parametrize("V", [1, 131, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_full_kl(gen, device, backend, dtype, V):
    skip_unsupported(device, backend, dtype)
    lead = (4, 2)
    x = _logits(gen, lead + (V,), dtype, device)
    noise = _logits(gen, lead + (V,), torch.float64, device, scale=1.0)
    r64 = x.double() + noise * torch.tensor([0.01, 1.0, 5.0, 0.0], dtype=torch.float64, device=device).view(4, 1, 1)
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
    assert maxerr(xx.grad[ok], x64.grad[ok]) <= _grad_bound(xl.grad[ok], x64.grad[ok], dtype)
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


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kl_penalty_takes_a_backend(gen, device, backend):
    """Like every op, kl_penalty takes ``backend``; every backend computes the same elementwise result."""
    lp = -torch.rand(2, 5, generator=gen).to(device)
    lr = lp + 0.3 * torch.randn(2, 5, generator=gen).to(device)
    out = rk.kl_penalty(lp, lr, "k3", clamp=2.0, backend=backend)
    torch.testing.assert_close(out, rk.kl_penalty(lp, lr, "k3", clamp=2.0), rtol=0, atol=0)


def test_kl_penalty_checks_its_backend():
    x = torch.zeros(3)
    with pytest.raises(rk.BackendUnavailable, match="cuda"):
        rk.kl_penalty(x, x, backend="cuda")  # CPU tensors: the cuda backend cannot serve them
    with pytest.raises(rk.BackendUnavailable, match="unknown backend"):
        rk.kl_penalty(x, x, backend="tpu")
    with pytest.raises(TypeError, match="backend"):
        rk.kl_penalty(x, x, backend=3)
    with pytest.raises(TypeError, match="logprobs"):
        rk.kl_penalty([0.0], x, backend="torch")


# ---- memory, robustness, bad input ----

@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_inplace_backward(gen, device, backend):
    V = 300
    x = _logits(gen, (4, V), torch.float32, device)
    y = make_labels(gen, (4,), V, device)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_stays_in_its_row(gen, device, backend, dtype):
    """A NaN logit makes its row's logp, entropy, KL and gradient NaN (all of the row's
    gradient, as PyTorch's), and leaves every other row clean."""
    V = 200  # CPU: one chunk; several vector steps and a tail
    x = _logits(gen, (4, V), dtype, device)
    x[1, 17] = float("nan")
    y = make_labels(gen, (4,), V, device, ignore_frac=0.0)
    y[1] = 3  # the NaN is not at the label
    xx = x.clone().requires_grad_(True)
    logp, ent = rk.token_logprobs(xx, y, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    xk = x.clone().requires_grad_(True)
    kl = rk.full_kl(xk, x.flip(0), backend=backend)
    kl.sum().backward()
    xh = x.clone().requires_grad_(True)
    h = rk.token_entropy(xh, backend=backend)
    h.sum().backward()
    clean = torch.tensor([0, 2, 3], device=device)
    logp64, ent64 = ref.token_logprobs(x[clean].double(), y[clean], 1.0, IGNORE)
    _assert_close_f32(logp[clean], logp64)
    _assert_close_f32(ent[clean], ent64)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1]) and torch.isnan(h[1])
    assert torch.isnan(xx.grad[1]).all() and torch.isnan(xh.grad[1]).all()
    assert torch.isfinite(xx.grad[clean]).all() and torch.isfinite(xh.grad[clean]).all()
    assert torch.isfinite(kl[[0, 3]]).all() and torch.isnan(kl[[1, 2]]).all()  # row 2 is compared with row 1
    assert torch.isnan(xk.grad[[1, 2]]).all() and torch.isfinite(xk.grad[[0, 3]]).all()


@pytest.mark.parametrize("V", [1, 9, 2048 + 5])  # 2048 + 5: a CPU chunk of its own for the NaN
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_rows_of_any_shape(gen, device, backend, V):
    """A row that is all NaN, or whose only NaNs fill a whole chunk, is NaN too (a chunk whose
    max skips every entry must not be taken for an empty one)."""
    if backend == "triton" and device == "cpu" and V > 1000:
        pytest.skip("slow under the Triton interpreter")
    x = _logits(gen, (3, V), torch.float32, device)
    x[1] = float("nan")
    x[2, -5:] = float("nan")
    y = torch.zeros(3, dtype=torch.long, device=device)
    xx = x.clone().requires_grad_(True)
    logp, ent = rk.token_logprobs(xx, y, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logp[0]) and torch.isfinite(ent[0]) and torch.isfinite(xx.grad[0]).all()
    assert torch.isnan(logp[1:]).all() and torch.isnan(ent[1:]).all() and torch.isnan(xx.grad[1:]).all()


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
        with pytest.raises(ValueError, match=r"labels\[5\] \(flat index\) = %d" % bad_value):
            rk.token_logprobs(x, yb, backend=backend)
    with pytest.raises(ValueError, match="V = 0"):
        rk.token_logprobs(torch.randn(2, 0, device=device), torch.zeros(2, dtype=torch.long, device=device),
                          backend=backend)
    with pytest.raises(ValueError, match="V = 0"):
        rk.token_entropy(torch.randn(2, 0, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"labels.*\[2, 3\].*got \[2, 2\]"):
        rk.token_logprobs(x, y[:, :2], backend=backend)
    with pytest.raises(TypeError, match="labels"):
        rk.token_logprobs(x, y.float(), backend=backend)
    with pytest.raises(TypeError, match="labels"):
        rk.token_logprobs(x, y > 0, backend=backend)
    with pytest.raises(TypeError, match="labels"):
        rk.token_logprobs(x, y.tolist(), backend=backend)
    with pytest.raises(TypeError, match="logits"):
        rk.token_logprobs(x.tolist(), y, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        rk.token_logprobs(x, y, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        rk.token_entropy(x, temperature=float("inf"), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        rk.full_kl(x, x, temperature=-1.0, backend=backend)
    with pytest.raises(ValueError, match="ref_logits"):
        rk.full_kl(x, x[:, :2], backend=backend)
    with pytest.raises(TypeError, match="ref_logits"):
        rk.full_kl(x, x.half(), backend=backend)
    with pytest.raises(ValueError, match="0-d"):
        rk.token_entropy(torch.tensor(1.0, device=device), backend=backend)


@pytest.mark.parametrize("backend", [p.values[1] for p in BACKENDS if p.values[0] == "cpu" and p.values[1] != "cpu"])
def test_bad_device(backend):
    # the native ops see mixed devices only between CPU and CUDA tensors (meta ones go to the fake kernel)
    x, y = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="device"):
        rk.token_logprobs(x, y.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="device"):
        rk.full_kl(x, x.to("meta"), backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_device_cuda(backend):
    if backend not in rk.available_backends("cuda"):
        pytest.skip("%s backend not available" % backend)
    x, y = torch.randn(2, 3, 10, device="cuda"), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="device"):
        rk.token_logprobs(x, y, backend=backend)
    with pytest.raises(ValueError, match="device"):
        rk.full_kl(x, x.cpu(), backend=backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_unvalidated_bad_label_gives_nan_and_no_gradient(gen, device, backend):
    """validate=False: a label outside [0, V) (not ignore_index) gives NaN logp and entropy at its
    position and a zero gradient row, never an error or a read outside the row."""
    V = 37
    x = _logits(gen, (2, 3, V), torch.float32, device)
    y = make_labels(gen, (2, 3), V, device, ignore_frac=0.0)
    y[0, 1], y[1, 0], y[1, 2] = V, -1, IGNORE
    xx = x.clone().requires_grad_(True)
    logp, ent = rk.token_logprobs(xx, y, return_entropy=True, validate=False, backend=backend)
    (logp.sum() + ent.sum()).backward()
    bad = torch.zeros(2, 3, dtype=torch.bool, device=device)
    bad[0, 1] = bad[1, 0] = True
    assert torch.isnan(logp[bad]).all() and torch.isnan(ent[bad]).all()
    assert logp[1, 2] == 0 and ent[1, 2] == 0
    good = ~bad & (y != IGNORE)
    logp64, ent64 = ref.token_logprobs(x[good].double(), y[good], 1.0, IGNORE)
    _assert_close_f32(logp[good], logp64)
    _assert_close_f32(ent[good], ent64)
    assert (xx.grad[bad] == 0).all() and (xx.grad[1, 2] == 0).all() and torch.isfinite(xx.grad).all()
    with pytest.raises(ValueError, match="labels"):
        rk.token_logprobs(x, y, backend=backend)  # validate=True (the default) raises


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_label_check_is_skipped_while_capturing(backend):
    """During CUDA graph capture the label check (a host sync) is skipped even with validate=True:
    a bad label then gives NaN, as with validate=False."""
    if backend not in rk.available_backends("cuda"):
        pytest.skip("%s backend not available" % backend)
    x = torch.randn(4, 33, device="cuda")
    y = torch.tensor([1, 2, 33, 5], device="cuda")
    out = rk.token_logprobs(x, y, validate=False, backend=backend)  # warm up (compilation, caches)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rk.token_logprobs(x, y, validate=False, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rk.token_logprobs(x, y, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


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
        y = make_labels(gen, (N,), V, device, dtype=ldtype)
        torch.library.opcheck(ops.token_logprobs_fwd, (x, y, 0.8, IGNORE, True, False))
        torch.library.opcheck(ops.token_entropy_fwd, (x, 1.2))
        torch.library.opcheck(ops.full_kl_fwd, (x, xr, 0.8))
        xd = x.detach()
        _, ent, stats = ops.token_logprobs_fwd(xd, y, 0.8, IGNORE, True, False)
        gl, gh = torch.randn(N, generator=gen).to(device), torch.randn(N, generator=gen).to(device)
        torch.library.opcheck(ops.logprobs_bwd, (xd, y, gl, gh, stats, ent, 0.8, IGNORE))
        torch.library.opcheck(ops.logprobs_bwd, (xd, None, None, gh, stats, ent, 0.8, IGNORE))
        torch.library.opcheck(ops.logprobs_bwd_inplace, (xd.clone(), y, gl, None, stats, ent, 0.8, IGNORE))
        kl, kstats = ops.full_kl_fwd(xd, xr, 0.8)
        torch.library.opcheck(ops.full_kl_bwd, (gl, xd, xr, kl, kstats, 0.8))
    # the ops take [..., V] logits of any strides and integer labels of any width
    big = _logits(gen, (2, 3, 2 * V), torch.float32, device)
    x3 = big[..., ::2].requires_grad_(True)
    y3 = make_labels(gen, (2, 3), V, device, dtype=torch.int16)
    torch.library.opcheck(ops.token_logprobs_fwd, (x3, y3, 1.0, IGNORE, False, False))
    torch.library.opcheck(ops.token_entropy_fwd, (x3, 1.0))
    torch.library.opcheck(ops.full_kl_fwd, (x3, big[..., 1::2], 1.0))
    _, ent3, stats3 = ops.token_logprobs_fwd(x3.detach(), y3, 1.0, IGNORE, False, False)
    g3 = torch.randn(3, 2, generator=gen).to(device).t()  # a non-contiguous upstream gradient
    torch.library.opcheck(ops.logprobs_bwd, (x3.detach(), y3, g3, None, stats3, ent3, 1.0, IGNORE))


@needs_native
@pytest.mark.parametrize("device", NATIVE_DEVICES)
def test_native_ops_check_their_arguments(device):
    """Called directly, the registered ops raise the Python API's exception types."""
    ops = torch.ops.rlhf_kernels
    x = torch.randn(4, 7, device=device)
    y = torch.randint(0, 7, (4,), device=device)
    with pytest.raises(TypeError, match="logits"):
        ops.token_logprobs_fwd(x.double(), y, 1.0, IGNORE, True, False)
    with pytest.raises(ValueError, match=r"labels.*\[4\].*got \[3\]"):
        ops.token_logprobs_fwd(x, y[:3], 1.0, IGNORE, True, False)
    with pytest.raises(ValueError, match=r"labels\[2\]"):
        ops.token_logprobs_fwd(x, torch.tensor([0, 1, 7, 2], device=device), 1.0, IGNORE, True, False)
    _, ent, stats = ops.token_logprobs_fwd(x, y, 1.0, IGNORE, True, False)
    with pytest.raises(ValueError, match="stats"):
        ops.logprobs_bwd(x, y, None, ent, stats[:3], ent, 1.0, IGNORE)
    with pytest.raises(ValueError, match="grad_logp"):
        ops.logprobs_bwd(x, y, ent[:2], None, stats, ent, 1.0, IGNORE)
    # grad_logp without labels: its -g p term, no one-hot (the vocabulary-parallel ops add that
    # on the rank that owns the label)
    g = torch.randn(4, device=device)
    no_onehot = ops.logprobs_bwd(x, None, g, None, stats, ent, 1.0, IGNORE)
    torch.testing.assert_close(no_onehot, -torch.softmax(x, -1) * g[:, None])
    with_labels = ops.logprobs_bwd(x, y, g, None, stats, ent, 1.0, IGNORE)
    torch.testing.assert_close(with_labels - no_onehot, torch.nn.functional.one_hot(y, 7) * g[:, None])
    with pytest.raises(ValueError, match="kl"):
        ops.full_kl_bwd(ent, x, x, ent[:1], stats, 1.0)


def _compile_case(gen, backend):
    V = 97
    x = _logits(gen, (3, 4, V), torch.float32, "cpu")
    xr = _logits(gen, (3, 4, V), torch.float32, "cpu")
    y = make_labels(gen, (3, 4), V, "cpu")

    def f(x, xr, y):
        # inplace_backward is ignored while torch.compile traces; validate costs no sync on the CPU
        logp, ent = rk.token_logprobs(x, y, temperature=0.9, return_entropy=True, inplace_backward=True,
                                      backend=backend)
        h = rk.token_entropy(x, backend=backend)
        kl = rk.full_kl(x, xr, backend=backend)
        k3 = rk.kl_penalty(logp, logp.detach() * 0.9, "k3", backend=backend)
        return logp.sum() + ent.sum() + h.sum() + kl.sum() + k3.sum()

    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    out_e = f(xe, xr, y)  # eager first (lazy imports, Triton compilation)
    out_e.backward()
    compiled = torch.compile(f, fullgraph=True)  # inductor: fake kernels, autograd, and codegen around the ops
    out_c = compiled(xc, xr, y)
    out_c.backward()
    assert torch.allclose(out_e, out_c, rtol=1e-6, atol=1e-5)
    assert torch.allclose(xe.grad, xc.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(xc, x)  # the compiled backward did not write over the logits


@needs_native
def test_torch_compile_fullgraph(gen):
    _compile_case(gen, "cpu")


@pytest.mark.skipif("triton" not in rk.available_backends("cpu"), reason="needs triton and TRITON_INTERPRET=1")
def test_torch_compile_fullgraph_triton(gen):
    _compile_case(gen, "triton")
