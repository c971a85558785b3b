"""linear_logprobs family: linear_token_logprobs (LM head + log-probabilities + entropy).

Every backend is compared with ``token_logprobs(hidden @ weight.T + bias, labels)`` evaluated
in float64 on the same (upcast) inputs. The kernels (cpu, cuda, triton) form the logits in
float32 from any input dtype, so their forward is held to LOGPROB_ATOL against float64 in
every dtype. The ``torch`` backend multiplies in the input dtype, as ``hidden @ weight.T``
does, so in 16-bit it is compared with the float64 evaluation of its own rounded logits.
Gradients wrt hidden, weight and bias: no worse than twice PyTorch's own error in that dtype
(the unfused reference run in the low dtype), plus a few ulps of the largest entry.
Each case also runs with a tiny tile budget, so that several vocabulary tiles, several token
tiles and a ragged last tile are all exercised at test sizes.
"""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import tolerances as tol
from conftest import device_backends, native_devices, needs_native
from rlhf_kernels.ops import linear_logprobs as lin_ops
from rlhf_kernels.reference import linear_logprobs as ref
from rlhf_kernels.reference import logprobs as ref_lp
from tests._helpers import IGNORE, make_labels, maxerr, skip_unsupported, tile_fixture

BACKENDS = device_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 0: the backend's default tile (one tile at these sizes); 300: 128-column vocabulary tiles
# of 2 tokens each (the budget divided by 128), so tokens and vocabulary are both tiled.
TILES = [0, 300]
pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest: torch.empty comes back NaN


def _inputs(gen, N, H, V, dtype, device, bias=True, scale=3.0):
    """hidden [N, H], weight [V, H], bias [V]: logits of standard deviation about ``scale``."""
    h = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64) * (scale / H ** 0.5)
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(w), cast(b)


def _matmul_err(h, w, b, temperature):
    """Per row, the worst-case error that forming the logits in float32 can add to logp or H:
    each float32 dot product of length H is off by at most gamma_H (|h| . |w_j|) (Higham,
    gamma_H = H u / (1 - H u), u = 2^-24; 16-bit products are exact in float32), and logp and
    H move by at most twice the largest logit error. It matters only for large logits."""
    H = h.shape[-1]
    u = 2.0 ** -24
    gamma = H * u / (1 - H * u)
    mag = h.double().abs() @ w.double().abs().T + (b.double().abs() if b is not None else 0)
    return 2 * gamma * mag.amax(-1) / temperature


def _assert_close_f32(ours, exact, extra=0.0):
    """|ours - exact| <= atol + a couple of float32 ulps of exact (+ ``extra``), elementwise."""
    err = (ours.double() - exact).abs()
    bound = tol.LOGPROB_ATOL + tol.LOGPROB_OUTPUT_ULPS * torch.finfo(torch.float32).eps * exact.abs() + extra
    assert (err <= bound).all(), (err - bound).max().item()


def _run(fn, h, w, b, y, a, c):
    """fn(h, w, b, y) -> (logp, entropy); returns them and the gradients of
    sum(a * logp + c * entropy) wrt h, w, b (None where an input is None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    logp, ent = fn(*leaves, y)
    ((logp.double() * a).sum() + (ent.double() * c).sum()).backward()
    return logp.detach(), ent.detach(), [None if t is None else t.grad for t in leaves]


def _unfused(h, w, b, y, temperature=1.0):
    return ref.linear_token_logprobs(h, w, y, b, temperature, IGNORE)


def _check(device, backend, h, w, b, y, temperature=1.0, gen=None):
    gen = gen or torch.Generator().manual_seed(h.numel() + w.numel())
    a = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device)
    c = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device)

    def ours(hh, ww, bb, yy):
        return rk.linear_token_logprobs(hh, ww, yy, bias=bb, temperature=temperature, return_entropy=True,
                                        backend=backend)

    def exact(hh, ww, bb, yy):
        return _unfused(hh, ww, bb, yy, temperature)

    up = lambda t: None if t is None else t.double()  # noqa: E731
    logp, ent, grads = _run(ours, h, w, b, y, a, c)
    logp64, ent64, grads64 = _run(exact, up(h), up(w), up(b), y, a, c)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == y.shape and ent.shape == y.shape
    if backend == "torch" and h.dtype != torch.float32:
        # the torch backend's logits are hidden @ weight.T (+ bias) rounded to the input dtype
        logits = h @ w.T + (b if b is not None else 0)
        f_logp, f_ent = ref_lp.token_logprobs(logits.double(), y, temperature, IGNORE)
        _assert_close_f32(logp, f_logp)
        _assert_close_f32(ent, f_ent)
    else:
        extra = _matmul_err(h, w, b, temperature).reshape(y.shape)
        _assert_close_f32(logp, logp64, extra)
        _assert_close_f32(ent, ent64, extra)
    ignored = y == IGNORE
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    own = _run(_unfused, h, w, b, y, a, c)[2]  # PyTorch's own gradients in the input dtype
    for name, g, g64, g_low, x in zip(("hidden", "weight", "bias"), grads, grads64, own, (h, w, b)):
        if x is None:
            assert g is None
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, name
        bound = (tol.GRAD_TORCH_ERR_FACTOR * maxerr(g_low, g64)
                 + tol.GRAD_ULPS * torch.finfo(x.dtype).eps * g64.abs().max().item())
        err = maxerr(g, g64)
        assert err <= bound, (name, err, bound)
    return logp, ent, grads


tile = tile_fixture(lin_ops, TILES, "linear_token_logprobs's tile budget, from TILES")


# ---- values and gradients ----

@pytest.mark.parametrize("N,H,V", [(7, 16, 1), (9, 29, 131), (13, 40, 300), (5, 64, 1031)],
                         ids=lambda s: str(s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_float64(gen, device, backend, dtype, bias, N, H, V, tile):
    skip_unsupported(device, backend, dtype)
    h, w, b = _inputs(gen, N, H, V, dtype, device, bias=bias)
    y = make_labels(gen, (N,), V, device)
    logp, ent, grads = _check(device, backend, h, w, b, y)
    again = rk.linear_token_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
    assert torch.equal(again[0], logp) and torch.equal(again[1], ent)  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_temperature_batch_dims_int32_noncontiguous(gen, device, backend, dtype, tile):
    H, V = 24, 257
    big = torch.randn(3, 4, 2 * H, generator=gen).to(dtype).to(device)
    h = big[..., ::2]  # non-contiguous [3, 4, H]
    assert not h.is_contiguous()
    _, w, b = _inputs(gen, 1, H, V, dtype, device)
    w_t = w.T.contiguous().T  # a non-contiguous [V, H] view
    y = make_labels(gen, (3, 4), V, device, dtype=torch.int32)
    before = (big.clone(), w.clone())
    _check(device, backend, h, w_t, b, y, temperature=0.7)
    assert torch.equal(big, before[0]) and torch.equal(w, before[1])  # inputs are never modified


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_equals_token_logprobs_of_the_logits(gen, device, backend, tile):
    h, w, b = _inputs(gen, 11, 32, 333, torch.float32, device)
    y = make_labels(gen, (11,), 333, device)
    logits = h @ w.T + b
    lp, ent = rk.linear_token_logprobs(h, w, y, bias=b, temperature=1.3, return_entropy=True, backend=backend)
    lp2, ent2 = rk.token_logprobs(logits, y, temperature=1.3, return_entropy=True, backend=backend)
    torch.testing.assert_close(lp, lp2, rtol=0, atol=2 * tol.LOGPROB_ATOL)
    torch.testing.assert_close(ent, ent2, rtol=0, atol=2 * tol.LOGPROB_ATOL)
    only = rk.linear_token_logprobs(h, w, y, bias=b, temperature=1.3, backend=backend)
    assert torch.is_tensor(only) and torch.equal(only, lp)


@pytest.mark.parametrize("case", ["label_near_one", "all_negative", "neg_inf_bias", "magnitude_1e4"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_adversarial(gen, device, backend, case, tile):
    N, H, V = 6, 16, 300
    h, w, b = _inputs(gen, N, H, V, torch.float32, device)
    y = make_labels(gen, (N,), V, device, ignore_frac=0.0)
    if case == "label_near_one":  # the label's logit 40 above the rest: p(label) ~ 1
        b = b.clone()
        b[y] += 40.0
    elif case == "all_negative":
        b = b - 50.0
    elif case == "neg_inf_bias":  # columns that can never be chosen: p = 0 exactly
        b = b.clone()
        b[::3] = float("-inf")
        y = torch.where(y % 3 == 0, y + 1, y).clamp(max=V - 1)
    else:  # logits near 1e4: a float32 logsumexp is off by ~5e-4 here
        w = w * 3000.0
    _check(device, backend, h, w, b, y)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_partial_gradients(gen, device, backend, tile):
    """Frozen inputs get no gradient (and cost no matmul); entropy alone or logp alone flows."""
    h, w, b = _inputs(gen, 9, 20, 200, torch.float32, device)
    y = make_labels(gen, (9,), 200, device)
    hh = h.clone().requires_grad_(True)
    lp, ent = rk.linear_token_logprobs(hh, w, y, bias=b, return_entropy=True, backend=backend)
    ent.sum().backward()  # entropy only; weight and bias frozen
    assert w.grad is None and b.grad is None
    h64 = h.double().requires_grad_(True)
    _unfused(h64, w.double(), b.double(), y)[1].sum().backward()
    torch.testing.assert_close(hh.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    ww = w.clone().requires_grad_(True)
    rk.linear_token_logprobs(h, ww, y, backend=backend).sum().backward()  # weight only, no bias, logp only
    w64 = w.double().requires_grad_(True)
    _unfused(h.double(), w64, None, y)[0].sum().backward()
    torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_stays_in_its_row(gen, device, backend, tile):
    """A NaN in a row of hidden makes that row's logp, entropy and d_hidden NaN (all of it, as
    PyTorch's) and leaves the other rows clean; d_weight sums over rows, so it is NaN too."""
    h, w, b = _inputs(gen, 8, 16, 300, torch.float32, device)
    y = make_labels(gen, (8,), 300, device, ignore_frac=0.0)
    h = h.clone()
    h[3, 5] = float("nan")
    hh = h.clone().requires_grad_(True)
    lp, ent = rk.linear_token_logprobs(hh, w, y, bias=b, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert torch.isnan(lp[3]) and torch.isnan(ent[3])
    others = torch.arange(8, device=device) != 3
    assert torch.isfinite(lp[others]).all() and torch.isfinite(ent[others]).all()
    assert torch.isnan(hh.grad[3]).all() and torch.isfinite(hh.grad[others]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_unvalidated_bad_label_gives_nan_and_no_gradient(gen, device, backend, tile):
    """validate=False: a label outside [0, V) (not ignore_index) gives NaN logp and entropy at its
    position and no gradient, never an error or a read outside the vocabulary."""
    N, H, V = 7, 16, 300
    h, w, b = _inputs(gen, N, H, V, torch.float32, device)
    y = make_labels(gen, (N,), V, device, ignore_frac=0.0)
    y[1], y[4], y[5] = V, -3, IGNORE
    bad = torch.zeros(N, dtype=torch.bool, device=device)
    bad[[1, 4]] = True
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = rk.linear_token_logprobs(hh, ww, y, bias=b, return_entropy=True, validate=False, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert torch.isnan(lp[bad]).all() and torch.isnan(ent[bad]).all()
    assert lp[5] == 0 and ent[5] == 0
    good = ~bad & (y != IGNORE)
    lp64, ent64 = _unfused(h[good].double(), w.double(), b.double(), y[good])
    extra = _matmul_err(h[good], w, b, 1.0)
    _assert_close_f32(lp[good], lp64, extra)
    _assert_close_f32(ent[good], ent64, extra)
    assert (hh.grad[bad] == 0).all() and (hh.grad[5] == 0).all()
    assert torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()
    yg = torch.where(bad, IGNORE, y)  # the same step with the bad labels ignored: the same d_weight
    ww2 = w.clone().requires_grad_(True)
    lp2, ent2 = rk.linear_token_logprobs(h, ww2, yg, bias=b, return_entropy=True, backend=backend)
    (lp2.sum() + ent2.sum()).backward()
    torch.testing.assert_close(ww.grad, ww2.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        rk.linear_token_logprobs(h, w, y, bias=b, backend=backend)  # validate=True (the default) raises


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_ignored_and_custom_ignore_index(gen, device, backend):
    h, w, b = _inputs(gen, 5, 16, 50, torch.float32, device)
    y = torch.full((5,), 7, dtype=torch.long, device=device)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = rk.linear_token_logprobs(hh, ww, y, ignore_index=7, return_entropy=True, backend=backend)
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (hh.grad == 0).all() and (ww.grad == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty(device, backend):
    h = torch.randn(0, 3, 8, device=device).requires_grad_(True)
    w = torch.randn(10, 8, device=device).requires_grad_(True)
    y = torch.zeros(0, 3, dtype=torch.long, device=device)
    lp, ent = rk.linear_token_logprobs(h, w, y, return_entropy=True, backend=backend)
    assert lp.shape == (0, 3) and ent.shape == (0, 3)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape and (w.grad == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_input(device, backend):
    h = torch.randn(2, 3, 8, device=device)
    w = torch.randn(10, 8, device=device)
    y = torch.randint(0, 10, (2, 3), device=device)
    lin = rk.linear_token_logprobs
    for bad_value in (10, -1, 1 << 40):
        yb = y.clone()
        yb[1, 2] = bad_value
        with pytest.raises(ValueError, match=r"labels\[5\] \(flat index\) = %d" % bad_value):
            lin(h, w, yb, backend=backend)
    with pytest.raises(ValueError, match=r"weight.*H = 8"):
        lin(h, torch.randn(10, 7, device=device), y, backend=backend)
    with pytest.raises(ValueError, match="V = 0"):
        lin(h, torch.randn(0, 8, device=device), y, backend=backend)
    with pytest.raises(ValueError, match=r"labels.*\[2, 3\].*got \[2, 2\]"):
        lin(h, w, y[:, :2], backend=backend)
    with pytest.raises(TypeError, match="labels"):
        lin(h, w, y.float(), backend=backend)
    with pytest.raises(TypeError, match="weight.*dtype"):
        lin(h, w.double(), y, backend=backend)
    with pytest.raises(TypeError, match="bias.*dtype"):
        lin(h, w, y, bias=torch.randn(10, dtype=torch.float64, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"bias.*\[10\]"):
        lin(h, w, y, bias=torch.randn(9, device=device), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        lin(h, w, y, temperature=-1.0, backend=backend)
    with pytest.raises(ValueError, match="weight"):
        lin(h, w[None], y, backend=backend)
    with pytest.raises(TypeError, match="weight"):
        lin(h, w.tolist(), y, backend=backend)


@pytest.mark.parametrize("backend", [p.values[1] for p in BACKENDS if p.values[0] == "cpu" and p.values[1] != "cpu"])
def test_bad_device(backend):
    # the native ops see mixed devices only between CPU and CUDA tensors (meta ones go to the fake kernel)
    h, w, y = torch.randn(2, 3, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="device"):
        rk.linear_token_logprobs(h, w, y.to("meta"), backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_device_cuda(backend):
    if backend not in rk.available_backends("cuda"):
        pytest.skip("%s backend not available" % backend)
    h, w, y = torch.randn(2, 3, 8, device="cuda"), torch.randn(10, 8, device="cuda"), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="device"):
        rk.linear_token_logprobs(h, w, y, backend=backend)
    with pytest.raises(ValueError, match="device"):
        rk.linear_token_logprobs(h, w.cpu(), y.cuda(), backend=backend)


def test_explicit_backend_rejects_float64():
    h, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 6, (3,))
    with pytest.raises(rk.BackendUnavailable, match="float64"):
        rk.linear_token_logprobs(h, w, y, backend="cpu")
    lp = rk.linear_token_logprobs(h, w, y)  # auto falls back to the torch backend
    assert lp.dtype == torch.float32


def test_reference_chunking_matches_unchunked(gen):
    """The torch backend's token chunks (with checkpointing) change nothing."""
    h, w, b = _inputs(gen, 23, 16, 100, torch.float32, "cpu")
    y = make_labels(gen, (23,), 100, "cpu")
    a = torch.randn(23, generator=gen, dtype=torch.float64)
    c = torch.randn(23, generator=gen, dtype=torch.float64)
    whole = _run(lambda hh, ww, bb, yy: _unfused(hh, ww, bb, yy), h, w, b, y, a, c)
    chunked = _run(lambda hh, ww, bb, yy: ref.chunked_linear_token_logprobs(hh, ww, yy, bb, chunk_elems=500),
                   h, w, b, y, a, c)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
    for g1, g2 in zip(chunked[2], whole[2]):
        torch.testing.assert_close(g1, g2)


# ---- torch.library registration: opcheck and torch.compile ----

NATIVE_DEVICES = native_devices()


@needs_native
@pytest.mark.parametrize("device", NATIVE_DEVICES)
def test_opcheck(gen, device):
    ops = torch.ops.rlhf_kernels
    N, H, V = 5, 16, 260
    for dtype, ldtype, tile in ((torch.float32, torch.int64, 0), (torch.bfloat16, torch.int32, 300)):
        h, w, b = _inputs(gen, N, H, V, dtype, device)
        y = make_labels(gen, (N,), V, device, dtype=ldtype)
        hg, wg, bg = (t.clone().requires_grad_(True) for t in (h, w, b))
        torch.library.opcheck(ops.linear_logprobs_fwd, (hg, wg, bg, y, 0.8, IGNORE, tile, True))
        torch.library.opcheck(ops.linear_logprobs_fwd, (hg, wg, None, y, 1.0, IGNORE, tile, False))
        _, ent, stats = ops.linear_logprobs_fwd(h, w, b, y, 0.8, IGNORE, tile, True)
        gl, gh = torch.randn(N, generator=gen).to(device), torch.randn(N, generator=gen).to(device)
        torch.library.opcheck(ops.linear_logprobs_bwd, (h, w, b, y, gl, gh, stats, ent, 0.8, IGNORE, tile,
                                                        True, True, True))
        torch.library.opcheck(ops.linear_logprobs_bwd, (h, w, None, y, None, gh, stats, ent, 0.8, IGNORE, tile,
                                                        True, False, False))
    # [..., H] hidden of any strides, a non-contiguous weight, integer labels of any width
    h, w, b = _inputs(gen, 6, H, V, torch.float32, device)
    h3 = h.reshape(2, 3, H).transpose(0, 1).requires_grad_(True)
    y3 = make_labels(gen, (3, 2), V, device, dtype=torch.int16)
    wt = w.t().contiguous().t().requires_grad_(True)
    torch.library.opcheck(ops.linear_logprobs_fwd, (h3, wt, b, y3, 1.0, IGNORE, 0, True))


def _compile_case(gen, backend):
    h, w, b = _inputs(gen, 12, 16, 200, torch.float32, "cpu")
    y = make_labels(gen, (3, 4), 200, "cpu")
    h = h.reshape(3, 4, 16)

    def f(h, w, b, y):
        lp, ent = rk.linear_token_logprobs(h, w, y, bias=b, temperature=0.9, return_entropy=True, backend=backend)
        return (lp * 2).sum() + ent.sum()

    leaves_e = [t.clone().requires_grad_(True) for t in (h, w, b)]
    leaves_c = [t.clone().requires_grad_(True) for t in (h, w, b)]
    out_e = f(*leaves_e, y)  # eager first (lazy imports, Triton compilation)
    out_e.backward()
    compiled = torch.compile(f, fullgraph=True)
    out_c = compiled(*leaves_c, y)
    out_c.backward()
    assert torch.allclose(out_e, out_c, rtol=1e-6, atol=1e-5)
    for a, c in zip(leaves_e, leaves_c):
        assert torch.allclose(a.grad, c.grad, rtol=1e-5, atol=1e-6)


@needs_native
def test_torch_compile_fullgraph(gen):
    _compile_case(gen, "cpu")


@pytest.mark.skipif("triton" not in rk.available_backends("cpu"), reason="needs triton and TRITON_INTERPRET=1")
def test_torch_compile_fullgraph_triton(gen):
    _compile_case(gen, "triton")
