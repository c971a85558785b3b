"""ppo_policy_loss and ppo_value_loss against the float64 reference, on every backend."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend, _ext
from rlhf_kernels.reference import ppo as ref
from tests.conftest import device_backends
from tests.tolerances import GRAD_ATOL_FRAC, GRAD_RTOL, LOSS_RTOL, STAT_ATOL, STAT_RTOL

BACKENDS = device_backends()
AGGS = ref.LOSS_AGGS
pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest: torch.empty comes back NaN


def shape_for(backend):
    # the Triton interpreter is slow: small shapes, still several tiles per row
    return (4, 45) if backend == "triton" else (9, 301)


def make_mask(gen, B, T, device):
    mask = torch.rand(B, T, generator=gen) < 0.8
    mask[1] = False                      # a fully masked row
    mask[2, : T // 2] = False            # left padding
    mask[0, -T // 3:] = False            # right padding
    return mask.to(device)


def policy_inputs(gen, B, T, device, extreme=False):
    logp = -3 * torch.rand(B, T, generator=gen)
    if extreme:  # |logp - old_logp| up to 30, both signs
        old = logp - 30 * (2 * torch.rand(B, T, generator=gen) - 1)
    else:
        old = logp + 0.4 * torch.randn(B, T, generator=gen)
    adv = 2 * torch.randn(B, T, generator=gen)  # both signs
    return logp.to(device), old.to(device), adv.to(device), make_mask(gen, B, T, device)


def value_inputs(gen, B, T, device):
    values = torch.randn(B, T, generator=gen)
    old = values + 0.3 * torch.randn(B, T, generator=gen)
    returns = values + torch.randn(B, T, generator=gen)
    return values.to(device), old.to(device), returns.to(device), make_mask(gen, B, T, device)


def assert_loss(actual, expected, scale):
    assert actual.dtype == torch.float32 and actual.dim() == 0
    err = (actual.double() - expected.double()).abs().item()
    assert err <= LOSS_RTOL * scale.item() + 1e-12, (actual.item(), expected.item(), scale.item())


def assert_grad(actual, expected):
    assert actual.dtype == torch.float32
    expected = expected.to(actual.device)
    atol = GRAD_ATOL_FRAC * expected.abs().max().item() + 1e-30
    torch.testing.assert_close(actual.double(), expected, rtol=GRAD_RTOL, atol=atol)


def assert_stats(actual, expected):
    assert set(actual) == set(expected)
    for k in expected:
        assert actual[k].dtype == torch.float32 and actual[k].dim() == 0, k
        torch.testing.assert_close(actual[k].double().cpu(), expected[k].cpu(), rtol=STAT_RTOL, atol=STAT_ATOL,
                                   msg=lambda m: "stat %s: %s" % (k, m))


def policy_reference(logp, old, adv, mask, **kw):
    x = logp.detach().double().requires_grad_()
    loss, stats = ref.ppo_policy_loss(x, old.double(), adv.double(), mask, **kw)
    loss.backward()
    # an upper bound of |l| per token, aggregated like the loss: the scale of rounding errors
    ratio = torch.exp(logp.double() - old.double())
    bound = ref.aggregate(adv.double().abs() * (ratio + 2), mask, kw.get("loss_agg", "token-mean"),
                          kw.get("num_tokens"))
    return loss.detach(), stats, x.grad, bound


def value_reference(values, old, returns, mask, **kw):
    x = values.detach().double().requires_grad_()
    loss, stats = ref.ppo_value_loss(x, old.double(), returns.double(), mask, **kw)
    loss.backward()
    c = kw.get("clip") or 0.0
    v, o, r = values.double().abs(), old.double().abs(), returns.double().abs()
    bound = ref.aggregate(0.5 * ((v + r) ** 2 + (o + c + r) ** 2) + 1, mask, kw.get("loss_agg", "token-mean"),
                          kw.get("num_tokens"))
    return loss.detach(), stats, x.grad, bound


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
def test_policy_matches_reference(device, backend, loss_agg, extreme, gen):
    B, T = shape_for(backend)
    logp, old, adv, mask = policy_inputs(gen, B, T, device, extreme)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0 if extreme else 1.3, loss_agg=loss_agg)
    x = logp.clone().requires_grad_()
    loss, stats = rk.ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
    loss.backward()
    ref_loss, ref_stats, ref_grad, bound = policy_reference(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), **kw)
    assert_loss(loss.cpu(), ref_loss, bound)
    assert_stats(stats, ref_stats)
    assert_grad(x.grad.cpu(), ref_grad)
    assert (x.grad[~mask] == 0).all()
    assert ref_stats["clipfrac_low"] > 0 and ref_stats["clipfrac_high"] > 0 and ref_stats["dual_clipfrac"] > 0


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("clip_low,clip_high,dual_clip", [(0.2, None, None), (0.1, 0.3, None), (0.2, 0.2, 1.5)])
def test_policy_clip_settings(device, backend, clip_low, clip_high, dual_clip, gen):
    B, T = shape_for(backend)
    logp, old, adv, mask = policy_inputs(gen, B, T, device)
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    x = logp.clone().requires_grad_()
    loss, stats = rk.ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
    loss.backward()
    ref_loss, ref_stats, ref_grad, bound = policy_reference(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), **kw)
    assert_loss(loss.cpu(), ref_loss, bound)
    assert_stats(stats, ref_stats)
    assert_grad(x.grad.cpu(), ref_grad)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_policy_microbatch_invariance(device, backend, as_tensor, gen):
    """Two micro-batches with the global num_tokens sum to the full batch's loss and gradient."""
    B, T = shape_for(backend)
    logp, old, adv, mask = policy_inputs(gen, B, T, device)
    n = int(mask.sum())
    num_tokens = torch.tensor(n, device=device) if as_tensor else n
    x = logp.clone().requires_grad_()
    full, _ = rk.ppo_policy_loss(x, old, adv, mask, num_tokens=num_tokens, backend=backend)
    full.backward()
    y = logp.clone().requires_grad_()
    total = 0
    for part in (slice(0, B // 2), slice(B // 2, B)):
        loss, _ = rk.ppo_policy_loss(y[part], old[part], adv[part], mask[part], num_tokens=num_tokens,
                                     backend=backend)
        total = total + loss
    total.backward()
    ref_loss, _, ref_grad, bound = policy_reference(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), num_tokens=n)
    assert_loss(full.cpu(), ref_loss, bound)
    assert_loss(total.cpu(), ref_loss, bound)
    assert_grad(x.grad.cpu(), ref_grad)
    assert_grad(y.grad.cpu(), ref_grad)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGGS)
def test_all_masked_batch(device, backend, loss_agg, gen):
    B, T = shape_for(backend)
    logp, old, adv, _ = policy_inputs(gen, B, T, device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    x = logp.clone().requires_grad_()
    loss, stats = rk.ppo_policy_loss(x, old, adv, mask, loss_agg=loss_agg, dual_clip=2.0, backend=backend)
    loss.backward()
    assert loss.item() == 0 and all(s.item() == 0 for s in stats.values())
    assert (x.grad == 0).all()
    values, old_v, returns, _ = value_inputs(gen, B, T, device)
    y = values.clone().requires_grad_()
    vloss, vstats = rk.ppo_value_loss(y, old_v, returns, mask, loss_agg=loss_agg, backend=backend)
    vloss.backward()
    assert vloss.item() == 0 and all(s.item() == 0 for s in vstats.values())
    assert (y.grad == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("clip", [0.2, None], ids=["clip", "noclip"])
def test_value_matches_reference(device, backend, loss_agg, clip, gen):
    B, T = shape_for(backend)
    values, old, returns, mask = value_inputs(gen, B, T, device)
    x = values.clone().requires_grad_()
    loss, stats = rk.ppo_value_loss(x, old, returns, mask, clip=clip, loss_agg=loss_agg, backend=backend)
    loss.backward()
    ref_loss, ref_stats, ref_grad, bound = value_reference(values.cpu(), old.cpu(), returns.cpu(), mask.cpu(),
                                                           clip=clip, loss_agg=loss_agg)
    assert_loss(loss.cpu(), ref_loss, bound)
    assert_stats(stats, ref_stats)
    assert_grad(x.grad.cpu(), ref_grad)
    if clip is not None:
        assert 0 < ref_stats["vf_clipfrac"] < 1


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_value_microbatch_invariance_and_constant_returns(device, backend, gen):
    B, T = shape_for(backend)
    values, old, returns, mask = value_inputs(gen, B, T, device)
    n = torch.tensor(float(mask.sum()), device=device)
    x = values.clone().requires_grad_()
    total = 0
    for part in (slice(0, 1), slice(1, B)):
        loss, _ = rk.ppo_value_loss(x[part], old[part], returns[part], mask[part], num_tokens=n, backend=backend)
        total = total + loss
    total.backward()
    ref_loss, _, ref_grad, bound = value_reference(values.cpu(), old.cpu(), returns.cpu(), mask.cpu(),
                                                   num_tokens=n.cpu())
    assert_loss(total.cpu(), ref_loss, bound)
    assert_grad(x.grad.cpu(), ref_grad)
    # constant returns: Var(R) = 0 exactly, explained_var is defined as 0
    const = torch.full_like(returns, 0.3)
    _, stats = rk.ppo_value_loss(values, old, const, mask, backend=backend)
    assert stats["explained_var"].item() == 0


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_noncontiguous_and_low_precision(device, backend, gen):
    B, T = shape_for(backend)
    logp, old, adv, mask = policy_inputs(gen, B, 2 * T, device)
    # strided views (every other token) and an integer mask (nonzero = valid)
    lp, o, a, m = logp[:, ::2], old[:, ::2], adv[:, ::2], mask[:, ::2].to(torch.int32) * 2
    assert not lp.is_contiguous()
    x = torch.empty_strided(lp.shape, (2 * lp.stride(0), 2), device=device).copy_(lp).requires_grad_()
    assert not x.is_contiguous()
    loss, stats = rk.ppo_policy_loss(x, o, a, m, loss_agg="seq-mean-token-mean", backend=backend)
    loss.backward()
    ref_loss, ref_stats, ref_grad, bound = policy_reference(lp.cpu(), o.cpu(), a.cpu(), m.cpu() != 0,
                                                            loss_agg="seq-mean-token-mean")
    assert_loss(loss.cpu(), ref_loss, bound)
    assert_stats(stats, ref_stats)
    assert_grad(x.grad.cpu(), ref_grad)
    if backend == "triton":
        return  # the interpreter cannot do bf16 arithmetic
    # fp16 inputs are upcast exactly: the result equals the float32 call on the upcast values
    h = lp.half().requires_grad_()
    loss_h, _ = rk.ppo_policy_loss(h, o.half(), a.half(), m, backend=backend)
    loss_h.backward()
    f = h.detach().float().requires_grad_()
    loss_f, _ = rk.ppo_policy_loss(f, o.half().float(), a.half().float(), m, backend=backend)
    loss_f.backward()
    assert loss_h.dtype == torch.float32 and loss_h.item() == loss_f.item()
    assert h.grad.dtype == torch.float16 and torch.equal(h.grad, f.grad.half())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic(device, backend, gen):
    B, T = shape_for(backend)
    logp, old, adv, mask = policy_inputs(gen, B, T, device)
    outs = []
    for _ in range(2):
        x = logp.clone().requires_grad_()
        loss, stats = rk.ppo_policy_loss(x, old, adv, mask, backend=backend)
        loss.backward()
        outs.append((loss, torch.stack(list(stats.values())), x.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_many_rows(device, backend, gen):
    """More rows than one combine tile (64 rows under the Triton interpreter, 256 CUDA
    threads): the program that finishes last combines every row, bitwise the same each run."""
    B, T = (130, 3) if backend == "triton" else (300, 3)  # the interpreter runs ~10 ms a program
    logp, old, adv, mask = policy_inputs(gen, B, T, device)
    values, old_v, returns, _ = value_inputs(gen, B, T, device)
    kw = dict(dual_clip=2.0, loss_agg="seq-mean-token-mean")
    outs = []
    for _ in range(2):
        loss, stats = rk.ppo_policy_loss(logp, old, adv, mask, backend=backend, **kw)
        vloss, vstats = rk.ppo_value_loss(values, old_v, returns, mask, backend=backend)
        outs.append(torch.stack([loss, vloss, *stats.values(), *vstats.values()]))
    assert torch.equal(outs[0], outs[1])
    ref_loss, ref_stats, _, bound = policy_reference(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), **kw)
    assert_loss(loss.cpu(), ref_loss, bound)
    assert_stats(stats, ref_stats)
    ref_loss, ref_stats, _, bound = value_reference(values.cpu(), old_v.cpu(), returns.cpu(), mask.cpu())
    assert_loss(vloss.cpu(), ref_loss, bound)
    assert_stats(vstats, ref_stats)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 7, 8, 9, 20011])
def test_row_lengths(device, backend, T, gen):
    """Rows shorter than, equal to and just over the CPU kernels' 8-token vectors, and long
    rows (many float32 blocks summed in float64, and a partial last vector)."""
    if backend == "triton" and T > 1000:
        pytest.skip("too slow for the Triton interpreter")
    B = 3
    logp, old, adv, mask = policy_inputs(gen, B, T, device)
    mask[0] = torch.rand(T, generator=gen).to(device) < 0.9  # not the fixed pattern of make_mask at T = 1
    for loss_agg in ("token-mean", "seq-mean-token-mean"):
        kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=1.3, loss_agg=loss_agg)
        x = logp.clone().requires_grad_()
        loss, stats = rk.ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
        loss.backward()
        ref_loss, ref_stats, ref_grad, bound = policy_reference(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), **kw)
        assert_loss(loss.cpu(), ref_loss, bound)
        assert_stats(stats, ref_stats)
        assert_grad(x.grad.cpu(), ref_grad)
    values, old_v, returns, _ = value_inputs(gen, B, T, device)
    y = values.clone().requires_grad_()
    vloss, vstats = rk.ppo_value_loss(y, old_v, returns, mask, clip=0.2, backend=backend)
    vloss.backward()
    ref_loss, ref_stats, ref_grad, bound = value_reference(values.cpu(), old_v.cpu(), returns.cpu(), mask.cpu(),
                                                           clip=0.2)
    assert_loss(vloss.cpu(), ref_loss, bound)
    assert_stats(vstats, ref_stats)
    assert_grad(y.grad.cpu(), ref_grad)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_tokens_are_ignored(device, backend, gen):
    """NaN and inf at masked tokens change nothing: not the loss, the statistics or the gradient."""
    if backend == "torch":
        pytest.skip("the eager reference's gradient is NaN there (0 * exp(NaN) in autograd), within its row")
    B, T = shape_for(backend)
    logp, old, adv, mask = policy_inputs(gen, B, T, device)
    values, old_v, returns, _ = value_inputs(gen, B, T, device)
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    idx = torch.randint(0, 3, (B, T), generator=gen).to(device)

    def run(poison):
        args = [logp, old, adv, values, old_v, returns]
        if poison:
            args = [torch.where(mask, a, junk[(idx + k) % 3]) for k, a in enumerate(args)]
        x, y = args[0].clone().requires_grad_(), args[3].clone().requires_grad_()
        pl, ps = rk.ppo_policy_loss(x, args[1], args[2], mask, dual_clip=2.0, backend=backend)
        vl, vs = rk.ppo_value_loss(y, args[4], args[5], mask, backend=backend)
        (pl + vl).backward()
        return [pl, vl, *ps.values(), *vs.values(), x.grad, y.grad]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_empty_batch(gen):
    for backend in _backend.available("cpu"):
        x = torch.empty(0, 5, requires_grad=True)
        loss, stats = rk.ppo_policy_loss(x, x.detach(), x.detach(), torch.zeros(0, 5, dtype=torch.bool),
                                         backend=backend)
        loss.backward()
        assert loss.item() == 0 and x.grad.shape == (0, 5)
        assert all(s.item() == 0 for s in stats.values())
        vloss, vstats = rk.ppo_value_loss(x, x.detach(), x.detach(), torch.zeros(0, 5, dtype=torch.bool),
                                          backend=backend)
        assert vloss.item() == 0 and all(s.item() == 0 for s in vstats.values())


def test_bad_inputs():
    lp = torch.randn(3, 8)
    m = torch.ones(3, 8, dtype=torch.bool)
    f = rk.ppo_policy_loss
    with pytest.raises(ValueError, match=r"`old_logprobs` has shape \[3, 7\]"):
        f(lp, torch.randn(3, 7), lp, m)
    with pytest.raises(ValueError, match="`logprobs` must have 2 dimension"):
        f(lp[0], lp[0], lp[0], m[0])
    with pytest.raises(ValueError, match="`mask` has shape"):
        f(lp, lp, lp, m[:, :4])
    with pytest.raises(TypeError, match="`advantages` must be a floating-point tensor"):
        f(lp, lp, torch.ones(3, 8, dtype=torch.long), m)
    with pytest.raises(ValueError, match="`loss_agg` must be one of"):
        f(lp, lp, lp, m, loss_agg="seq-mean")
    with pytest.raises(ValueError, match="`dual_clip` must be > 1"):
        f(lp, lp, lp, m, dual_clip=1.0)
    with pytest.raises(ValueError, match="`clip_low` must be >= 0"):
        f(lp, lp, lp, m, clip_low=-0.1)
    with pytest.raises(ValueError, match="`num_tokens` must be > 0"):
        f(lp, lp, lp, m, num_tokens=0)
    with pytest.raises(ValueError, match="`num_tokens` must be a number or a 0-d tensor"):
        f(lp, lp, lp, m, num_tokens=torch.ones(2))
    with pytest.raises(_backend.BackendUnavailable, match="cuda"):
        f(lp, lp, lp, m, backend="cuda")
    with pytest.raises(ValueError, match="`clip` must be > 0"):
        rk.ppo_value_loss(lp, lp, lp, m, clip=0.0)
    with pytest.raises(ValueError, match="`returns` has shape"):
        rk.ppo_value_loss(lp, lp, lp[:2], m)


needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="native extension not built")


@needs_ext
def test_opcheck(gen):
    B, T = 4, 23
    logp, old, adv, mask = policy_inputs(gen, B, T, "cpu")
    nt = torch.tensor(50.0, dtype=torch.float64)
    ops = torch.ops.rlhf_kernels
    x = logp.clone().requires_grad_()
    for args in [(x, old, adv, mask, None, None, 0.2, 0.28, 3.0, 1), (x, old, adv, mask, nt, None, 0.2, None, None, 0),
                 (x, old, adv, mask.long(), None, 40.0, 0.2, 0.2, None, 0)]:
        torch.library.opcheck(ops.ppo_policy_fwd, args)
    _, _, scale = ops.ppo_policy_fwd(logp, old, adv, mask, None, None, 0.2, 0.2, None, 0)
    torch.library.opcheck(ops.ppo_policy_bwd, (torch.tensor(1.5), logp, old, adv, mask, scale, 0.2, 0.2, 2.0))
    values, old_v, returns, _ = value_inputs(gen, B, T, "cpu")
    y = values.clone().requires_grad_()
    for args in [(y, old_v, returns, mask, None, None, 0.2, 2), (y, old_v, returns, mask, nt, None, None, 0),
                 (y.half(), old_v, returns, mask, None, 30.0, 0.2, 0)]:
        torch.library.opcheck(ops.ppo_value_fwd, args)
    _, _, scale = ops.ppo_value_fwd(values, old_v, returns, mask, None, None, 0.2, 3)
    torch.library.opcheck(ops.ppo_value_bwd, (torch.tensor(0.5), values, old_v, returns, mask, scale, 0.2))


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_compile_fullgraph(gen, device, backend):
    B, T = 4, 37
    logp, old, adv, mask = policy_inputs(gen, B, T, device)
    values, old_v, returns, _ = value_inputs(gen, B, T, device)

    def step(lp, v, num_tokens):
        pl, ps = rk.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, num_tokens=num_tokens, backend=backend)
        vl, vs = rk.ppo_value_loss(v, old_v, returns, mask, num_tokens=num_tokens, backend=backend)
        return pl + 0.5 * vl, ps["clipfrac"], vs["explained_var"]

    step(logp, values, None)  # eager first: the backend's modules and ops are loaded
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    nt = torch.tensor(100.0, device=device)
    results = []
    for fn in (step, compiled):
        x, y = logp.clone().requires_grad_(), values.clone().requires_grad_()
        loss, cf, ev = fn(x, y, nt)
        loss.backward()
        results.append((loss, cf, ev, x.grad, y.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_ext
def test_thread_count_invariance(gen):
    """The CPU kernels' results do not depend on the number of threads."""
    B, T = 37, 1031  # several parallel chunks of rows
    logp, old, adv, mask = policy_inputs(gen, B, T, "cpu")
    values, old_v, returns, _ = value_inputs(gen, B, T, "cpu")
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            x, y = logp.clone().requires_grad_(), values.clone().requires_grad_()
            pl, ps = rk.ppo_policy_loss(x, old, adv, mask, dual_clip=3.0, loss_agg="seq-mean-token-mean",
                                        backend="cpu")
            vl, vs = rk.ppo_value_loss(y, old_v, returns, mask, backend="cpu")
            (pl + vl).backward()
            outs.append([pl, vl, *ps.values(), *vs.values(), x.grad, y.grad])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
