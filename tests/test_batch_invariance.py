"""Batch invariance (DESIGN.md): a row's log-prob, entropy and KL, and its gradient row where the
gradient is row-wise (d logits, d hidden; not d weight or d bias, which sum over rows), are bitwise
the same whatever other rows share its batch, how many there are, and in which order, on every
backend.

Each case computes a batch of fresh random rows, then sub-batches of it: 1, 3 and 17 rows picked at
random (gathered into fresh tensors), 17 consecutive rows as a view at an odd offset (so the
sub-batch does not start where an allocation starts), a permutation of the whole batch, and half of
it; every row's outputs, and its gradient rows from a backward with a row-wise upstream gradient,
must equal the full batch's with torch.equal. linear_policy_loss is checked on its per-token
`logprobs` stat, with and without gradients asked for (its d hidden is not row-wise: every token's
weight in the aggregated loss depends on the batch).

2500 rows on the fast backends, whose fused heads then run several row chunks; fewer under the
Triton interpreter, which is slow. The cuda-marked case at the end runs the fused heads at a
realistic size (N up to 4096, V = 32000, H = 1024, bf16).
"""

import pytest
import torch

import rlhf_kernels as rk
from conftest import HAS_CUDA, device_backends
from tests._helpers import IGNORE, skip_unsupported

BACKENDS = device_backends()
DTYPES = [torch.float32, torch.bfloat16]


def _interpreted(device, backend):
    return device == "cpu" and backend == "triton"


def _vocab(device, backend):
    """V of the row-wise ops: smaller under the Triton interpreter, a multiple of no block size."""
    return 257 if _interpreted(device, backend) else 1031


def _rows(device, backend, dtype):
    """Rows of the full batch: fewer under the Triton interpreter (one program per row, in numpy)
    and for bfloat16 on the CPU (the torch backend's bfloat16 matmuls are slow there)."""
    if _interpreted(device, backend):
        return 24
    return 1000 if (device == "cpu" and dtype == torch.bfloat16) else 2500


def _subsets(gen, N):
    """(name, index) pairs: each a sub-batch of range(N), as a LongTensor, or a slice (a view)."""
    pick = lambda k: torch.randperm(N, generator=gen)[:k]  # noqa: E731
    return [("1 row", pick(1)), ("3 rows", pick(3)), ("17 rows", pick(17)),
            ("17 rows view", slice(5, 22)), ("permutation", torch.randperm(N, generator=gen)),
            ("half", pick(N // 2))]


def _take(t, idx):
    """The sub-batch of t's rows: a fresh tensor for an index, a view for a slice."""
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx.to(t.device))


def _leaf(t):
    return t.detach().clone().requires_grad_(True) if t.is_floating_point() else t


def _assert_rows_equal(name, what, full, sub, idx):
    want = _take(full, idx)
    assert sub.shape == want.shape, (name, what, sub.shape, want.shape)
    if not torch.equal(sub, want):
        diff = (sub.double() - want.double()).abs()
        diff = diff[~torch.isnan(diff)]
        bad = int((sub != want).sum()) if sub.numel() else 0
        pytest.fail("%s: %s of the sub-batch differs from the full batch's in %d elements (max abs difference "
                    "%.3g)" % (name, what, bad, diff.max().item() if diff.numel() else float("nan")))


def _check(gen, N, run, inputs, row_grads):
    """run(*inputs) -> (outputs tuple [rows...], grads of the inputs named by row_grads) on the full
    batch and on each sub-batch; inputs are [N, ...] tensors cut along dim 0."""
    full_out, full_grads = run(*inputs)
    for name, idx in _subsets(gen, N):
        out, grads = run(*[_take(t, idx) for t in inputs])
        for k, (a, b) in enumerate(zip(full_out, out)):
            _assert_rows_equal(name, "output %d" % k, a, b, idx)
        for k, (a, b) in enumerate(zip(full_grads, grads)):
            _assert_rows_equal(name, "the gradient of %s" % row_grads[k], a, b, idx)


def _with_grads(fn, leaves, upstream):
    """outputs of fn(*leaves), and d (sum_k upstream[k] * outputs[k]) / d leaves."""
    outs = fn(*leaves)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, leaves)
    return tuple(o.detach() for o in outs), grads


# ---- the row-wise ops on given logits ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_token_logprobs_and_entropy(gen, device, backend, dtype):
    skip_unsupported(device, backend, dtype)
    N, V = _rows(device, backend, dtype), _vocab(device, backend)
    logits = (3 * torch.randn(N, V, generator=gen)).to(dtype).to(device)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.1] = IGNORE
    labels = labels.to(device)
    g_lp, g_ent = torch.randn(N, generator=gen).to(device), torch.randn(N, generator=gen).to(device)

    def run(z, y, gl, ge):
        fn = lambda z: rk.token_logprobs(z, y, temperature=0.9, ignore_index=IGNORE,  # noqa: E731
                                         return_entropy=True, backend=backend)
        return _with_grads(fn, (_leaf(z),), (gl, ge))

    _check(gen, N, run, (logits, labels, g_lp, g_ent), ("logits",))

    def run_entropy(z, ge):
        return _with_grads(lambda z: (rk.token_entropy(z, temperature=1.1, backend=backend),), (_leaf(z),), (ge,))

    _check(gen, N, run_entropy, (logits, g_ent), ("logits",))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_full_kl(gen, device, backend, dtype):
    skip_unsupported(device, backend, dtype)
    N, V = _rows(device, backend, dtype), _vocab(device, backend)
    logits = (3 * torch.randn(N, V, generator=gen)).to(dtype).to(device)
    ref_logits = (3 * torch.randn(N, V, generator=gen)).to(dtype).to(device)
    g = torch.randn(N, generator=gen).to(device)

    def run(z, r, g):  # differentiable wrt logits (ref_logits is a constant)
        return _with_grads(lambda z: (rk.full_kl(z, r, temperature=0.9, backend=backend),), (_leaf(z),), (g,))

    _check(gen, N, run, (logits, ref_logits, g), ("logits",))


# ---- the fused heads ----

def _head(gen, N, H, V, dtype, device):
    h = torch.randn(N, H, generator=gen).to(dtype).to(device)
    w = (torch.randn(V, H, generator=gen) * (3 / H ** 0.5)).to(dtype).to(device)
    b = torch.randn(V, generator=gen).to(dtype).to(device)
    return h, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_linear_token_logprobs(gen, device, backend, dtype):
    skip_unsupported(device, backend, dtype)
    # V = 3001: two vocabulary tiles (one ragged) of the CPU op's default tiling
    N, H, V = _rows(device, backend, dtype), 48, 3001 if not _interpreted(device, backend) else 257
    hidden, weight, bias = _head(gen, N, H, V, dtype, device)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.1] = IGNORE
    labels = labels.to(device)
    g_lp, g_ent = torch.randn(N, generator=gen).to(device), torch.randn(N, generator=gen).to(device)
    w, b = _leaf(weight), _leaf(bias)  # gradients flow to them too (not compared: they sum over rows)

    def run(h, y, gl, ge):
        fn = lambda h: rk.linear_token_logprobs(h, w, y, bias=b, temperature=0.9, ignore_index=IGNORE,  # noqa: E731
                                                return_entropy=True, backend=backend)
        outs = fn(hl := _leaf(h))
        loss = (outs[0] * gl).sum() + (outs[1] * ge).sum()
        (d_hidden,) = torch.autograd.grad(loss, (hl,))
        return tuple(o.detach() for o in outs), (d_hidden,)

    _check(gen, N, run, (hidden, labels, g_lp, g_ent), ("hidden",))
    with torch.no_grad():  # the forward without autograd: the same rows again
        lp, ent = rk.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=0.9, ignore_index=IGNORE,
                                           return_entropy=True, backend=backend)
    full, _ = run(hidden, labels, g_lp, g_ent)
    assert torch.equal(lp, full[0]) and torch.equal(ent, full[1])


def _policy_logprobs(hidden, weight, bias, labels, old, adv, mask, backend, grad):
    """linear_policy_loss's per-token logprobs stat [B, T], with (grad) or without gradients asked for."""
    h, w = (_leaf(hidden), _leaf(weight)) if grad else (hidden, weight)
    with torch.set_grad_enabled(grad):
        loss, stats = rk.linear_policy_loss(h, w, labels, old, adv, mask, bias=bias, temperature=0.9,
                                            entropy_coef=0.01, backend=backend)
    if grad:
        loss.backward()
    return stats["logprobs"].detach()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_linear_policy_loss_logprobs(gen, device, backend, dtype):
    skip_unsupported(device, backend, dtype)
    N = _rows(device, backend, dtype)
    T = 5 if N >= 500 else 1  # the batch is cut into sequences of T tokens
    B, H, V = N // T, 48, 3001 if not _interpreted(device, backend) else 257
    hidden, weight, bias = _head(gen, B * T, H, V, dtype, device)
    hidden = hidden.view(B, T, H)
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    old = (-5 - torch.rand(B, T, generator=gen)).to(device)
    adv = torch.randn(B, T, generator=gen).to(device)
    mask = (torch.rand(B, T, generator=gen) < 0.9).to(device)

    # (under the interpreter only with gradients: the no-gradient path is the same kernel, checked
    # equal to it below)
    for grad in (True,) if _interpreted(device, backend) else (False, True):
        def run(h, y, o, a, m):
            return (_policy_logprobs(h, weight, bias, y, o, a, m, backend, grad),), ()

        _check(gen, B, run, (hidden, labels, old, adv, mask), ())
    # with and without gradients: the same logprobs
    assert torch.equal(_policy_logprobs(hidden, weight, bias, labels, old, adv, mask, backend, False),
                       _policy_logprobs(hidden, weight, bias, labels, old, adv, mask, backend, True))


# ---- a realistic size on the GPU ----

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_fused_heads_realistic_size_cuda(gen, backend):
    if backend not in rk._backend.available("cuda"):
        pytest.skip("backend %s not available on CUDA" % backend)
    N, H, V = 4096, 1024, 32000
    dev = "cuda"
    hidden, weight, bias = _head(gen, N, H, V, torch.bfloat16, dev)
    labels = torch.randint(0, V, (N,), generator=gen).to(dev)
    g_lp = torch.randn(N, generator=gen).to(dev)
    w = _leaf(weight)

    def run(h, y, gl):
        outs = rk.linear_token_logprobs(hl := _leaf(h), w, y, bias=bias, return_entropy=True, backend=backend)
        (d_hidden,) = torch.autograd.grad((outs[0] * gl).sum() + outs[1].sum(), (hl,))
        return tuple(o.detach() for o in outs), (d_hidden,)

    full_out, full_grads = run(hidden, labels, g_lp)
    for idx in (torch.arange(1), torch.arange(3000, 3003), torch.randperm(N, generator=gen)[:17],
                torch.randperm(N, generator=gen)[:1000], torch.randperm(N, generator=gen), slice(5, 2053)):
        out, grads = run(_take(hidden, idx), _take(labels, idx), _take(g_lp, idx))
        for k, (a, b) in enumerate(zip(full_out + full_grads, out + grads)):
            _assert_rows_equal("cuda %s" % backend, "output %d" % k, a, b, idx)

    T = 8
    h3, y3 = hidden.view(N // T, T, H), labels.view(N // T, T)
    old = (-5 - torch.rand(N // T, T, generator=gen)).to(dev)
    adv = torch.randn(N // T, T, generator=gen).to(dev)
    mask = torch.ones(N // T, T, dtype=torch.bool, device=dev)
    for grad in (False, True):
        full = _policy_logprobs(h3, weight, bias, y3, old, adv, mask, backend, grad)
        for idx in (torch.arange(1), torch.randperm(N // T, generator=gen)[:3], slice(1, 18),
                    torch.randperm(N // T, generator=gen)):
            sub = _policy_logprobs(_take(h3, idx), weight, bias, _take(y3, idx), _take(old, idx), _take(adv, idx),
                                   _take(mask, idx), backend, grad)
            _assert_rows_equal("cuda %s linear_policy_loss" % backend, "logprobs", full, sub, idx)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.values[1] != "triton"])
def test_fused_heads_agree_bitwise(device, backend):
    """The policy head's per-token log-probs equal linear_token_logprobs' bitwise (the on-policy ratio is then
    exactly 1 when old log-probs come from the latter, as in the trainer). The cpu backend once took two
    different logs (ATen's vectorized one and std::log) and differed by an ulp on a few tokens."""
    g = torch.Generator().manual_seed(7)
    N, H, V = 256, 64, 32
    h, w = torch.randn(N, H, generator=g).to(device), (torch.randn(V, H, generator=g) / 8).to(device)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    lp = rk.linear_token_logprobs(h, w, y, backend=backend)
    _, st = rk.linear_policy_loss(h[None], w, y[None], lp[None], torch.randn(1, N, generator=g).to(device),
                                  torch.ones(1, N, dtype=torch.bool, device=device), backend=backend)
    assert torch.equal(st["logprobs"][0], lp)
