"""ppo_policy_loss and ppo_value_loss against the float64 reference, on every backend."""

import functools

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend, _ext
from rlhf_kernels.reference import ppo as ref
from tests.conftest import device_backends
from tests._helpers import assert_grad, assert_loss_close, assert_stats_close, make_mask, policy_inputs
from rlhf_kernels.tolerances import GRAD_ATOL_FRAC, GRAD_RTOL, LOSS_RTOL

BACKENDS = device_backends()
AGGS = ref.LOSS_AGGS
pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest: torch.empty comes back NaN


def shape_for(backend):
    # the Triton interpreter is slow: small shapes, still several tiles per row
    return (4, 45) if backend == "triton" else (9, 301)


def value_inputs(gen, B, T, device):
    values = torch.randn(B, T, generator=gen)
    old = values + 0.3 * torch.randn(B, T, generator=gen)
    returns = values + torch.randn(B, T, generator=gen)
    return values.to(device), old.to(device), returns.to(device), make_mask(gen, B, T, 0.8, "sides", device)


assert_loss = functools.partial(assert_loss_close, rtol=LOSS_RTOL)


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
    assert_stats_close(stats, ref_stats)
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
    assert_stats_close(stats, ref_stats)
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
    assert_stats_close(stats, ref_stats)
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
    assert_stats_close(stats, ref_stats)
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
    assert_stats_close(stats, ref_stats)
    ref_loss, ref_stats, _, bound = value_reference(values.cpu(), old_v.cpu(), returns.cpu(), mask.cpu())
    assert_loss(vloss.cpu(), ref_loss, bound)
    assert_stats_close(vstats, ref_stats)


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
        assert_stats_close(stats, ref_stats)
        assert_grad(x.grad.cpu(), ref_grad)
    values, old_v, returns, _ = value_inputs(gen, B, T, device)
    y = values.clone().requires_grad_()
    vloss, vstats = rk.ppo_value_loss(y, old_v, returns, mask, clip=0.2, backend=backend)
    vloss.backward()
    ref_loss, ref_stats, ref_grad, bound = value_reference(values.cpu(), old_v.cpu(), returns.cpu(), mask.cpu(),
                                                           clip=0.2)
    assert_loss(vloss.cpu(), ref_loss, bound)
    assert_stats_close(vstats, ref_stats)
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


# ---- the policy loss's options: ratio_level, objective, loss_agg="token-sum", the rollout correction

IS_SETTINGS = [(None, None)] + [(c, lvl) for c in ("tis", "mis") for lvl in ("token", "sequence", "geometric")]
OPTION_SETS = [dict(ratio_level=rl, objective=obj, is_correction=c, is_level=lvl)
               for rl in ("token", "sequence") for obj in ("ppo", "cispo") for c, lvl in IS_SETTINGS]


def option_id(o):
    return "-".join(str(v) for v in o.values() if v is not None)


def option_inputs(gen, B, T, device, extreme=False):
    """policy_inputs with each row's log-ratios shifted (so that sequence ratios get clipped) and
    rollout log-probabilities. extreme: |logp - old| and |old - rollout| up to 30, every token
    of a row on one side (row means up to 30 in size, row sums far beyond exp's range)."""
    logp, old, adv, mask = (t.cpu() for t in policy_inputs(gen, B, T, "cpu"))
    side = torch.tensor([1.0, -1.0])[torch.arange(B) % 2][:, None]
    if extreme:
        old = logp - side * 30 * torch.rand(B, T, generator=gen)
        rollout = old + side * 30 * torch.rand(B, T, generator=gen)
    else:
        old = old - side * (0.3 + 0.3 * torch.rand(B, 1, generator=gen))  # s outside [0.8, 1.28]
        rollout = old + 0.4 * torch.randn(B, T, generator=gen)
    return [t.to(device) for t in (logp, old, adv, mask, rollout)]


def option_kwargs(o, rollout, loss_agg="token-mean", **extra):
    """The keyword arguments of ppo_policy_loss for option set `o` (None entries left out)."""
    kw = dict(clip_low=0.2, clip_high=0.28, loss_agg=loss_agg, ratio_level=o["ratio_level"], objective=o["objective"])
    if o["objective"] == "ppo":
        kw["dual_clip"] = 3.0
    if o["is_correction"] is not None:
        kw.update(rollout_logprobs=rollout, is_correction=o["is_correction"], is_level=o["is_level"])
        if o["is_correction"] == "tis":
            kw["is_cap"] = 1.5  # "mis" keeps the default cap, 2
    kw.update(extra)
    return kw


def options_reference(logp, old, adv, mask, **kw):
    """(loss, stats, d logprobs, loss bound, gradient bound) of the float64 reference. The
    bounds are the scales of rounding errors: the loss's, |l_t| <= c_t |A_t| (r_t + 2)(|logp_t| + 1)
    aggregated like the loss; the gradient's, |expected| per token, and for the PPO loss with
    the sequence ratio each row's w_b (s_b / n_b) sum_t c_t |A_t| (a sum that can cancel)."""
    kw = dict(kw)
    if kw.get("rollout_logprobs") is not None:
        kw["rollout_logprobs"] = kw["rollout_logprobs"].cpu().double()
    logp, old, adv, mask = logp.cpu().double(), old.cpu().double(), adv.cpu().double(), mask.cpu()
    x = logp.clone().requires_grad_()
    loss, stats = ref.ppo_policy_loss(x, old, adv, mask, **kw)
    loss.backward()
    agg, nt = kw.get("loss_agg", "token-mean"), kw.get("num_tokens")
    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    if kw.get("ratio_level") == "sequence":
        ratio = torch.exp(ref._row_mean(log_ratio, mask)).expand_as(ratio)
    c = torch.ones_like(ratio)
    if kw.get("is_correction") is not None:
        c, _ = ref.is_weights(old, kw["rollout_logprobs"], mask, kw["is_correction"], kw.get("is_level", "token"),
                              kw.get("is_cap", 2.0))
    bound = ref.aggregate(c * adv.abs() * (ratio + 2) * (logp.abs() + 1), mask, agg, nt)
    grad_bound = x.grad.abs()
    if kw.get("ratio_level") == "sequence" and kw.get("objective", "ppo") == "ppo":
        z = torch.zeros_like(logp, requires_grad=True)
        (w,) = torch.autograd.grad(ref.aggregate(z, mask, agg, nt), z)
        n = mask.sum(-1, keepdim=True).clamp(min=1)
        row = (torch.where(mask, c * adv.abs(), torch.zeros_like(adv))).sum(-1, keepdim=True) * ratio / n
        grad_bound = torch.maximum(grad_bound, torch.where(mask, w * row, torch.zeros_like(row)))
    return loss.detach(), stats, x.grad, bound, grad_bound


def assert_grad_bounded(actual, expected, bound):
    """|actual - expected| <= GRAD_RTOL * bound + GRAD_ATOL_FRAC * max |expected|, per token."""
    assert actual.dtype == torch.float32
    err = (actual.double().cpu() - expected).abs()
    tol = GRAD_RTOL * bound + GRAD_ATOL_FRAC * expected.abs().max() + 1e-30
    assert (err <= tol).all(), (err - tol).max().item()


def run_policy(logp, old, adv, mask, backend, **kw):
    x = logp.clone().requires_grad_()
    loss, stats = rk.ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
    loss.backward()
    return loss, stats, x.grad


# the Triton interpreter's numpy warns where a sequence weight overflows (as it should: then it is capped)
overflow_ok = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@overflow_ok
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
@pytest.mark.parametrize("i,o", list(enumerate(OPTION_SETS)), ids=[option_id(o) for o in OPTION_SETS])
def test_policy_options_match_reference(device, backend, i, o, extreme, gen):
    """Every combination of ratio_level x objective x is_correction x is_level against the
    float64 reference (loss_agg cycles through every mode), with moderate inputs and with
    log-ratios and behaviour log-weights up to 30 in size: values, statistics and gradients."""
    B, T = shape_for(backend)
    logp, old, adv, mask, rollout = option_inputs(gen, B, T, device, extreme)
    kw = option_kwargs(o, rollout, AGGS[i % len(AGGS)])
    loss, stats, grad = run_policy(logp, old, adv, mask, backend, **kw)
    ref_loss, ref_stats, ref_grad, bound, grad_bound = options_reference(logp, old, adv, mask, **kw)
    assert_loss(loss.cpu(), ref_loss, bound)
    assert_stats_close(stats, ref_stats)
    assert_grad_bounded(grad, ref_grad, grad_bound)
    assert torch.isfinite(loss) and torch.isfinite(stats.packed).all() and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert ref_stats["clipfrac"] > 0 and ref_stats["seq_clipfrac"] > 0
    if o["is_correction"] == "tis" and o["is_level"] == "token":
        assert 0 < ref_stats["is_capped_frac"] < 1


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("o", [OPTION_SETS[9], OPTION_SETS[24]], ids=option_id)
def test_policy_options_every_loss_agg(device, backend, loss_agg, o, gen):
    """GSPO with a sequence-level truncation and CISPO with a token-level mask, under every
    loss_agg, with and without a global num_tokens."""
    B, T = shape_for(backend)
    logp, old, adv, mask, rollout = option_inputs(gen, B, T, device)
    for extra in (dict(), dict(num_tokens=torch.tensor(1000.0, device=device))):
        kw = option_kwargs(o, rollout, loss_agg, **extra)
        loss, stats, grad = run_policy(logp, old, adv, mask, backend, **kw)
        ref_loss, ref_stats, ref_grad, bound, grad_bound = options_reference(logp, old, adv, mask, **kw)
        assert_loss(loss.cpu(), ref_loss, bound)
        assert_stats_close(stats, ref_stats)
        assert_grad_bounded(grad, ref_grad, grad_bound)


def test_token_sum_is_the_sum(gen):
    """loss_agg="token-sum" on the reference: the plain sum of the valid tokens' losses."""
    logp, old, adv, mask = policy_inputs(gen, 5, 17, "cpu")
    total, _ = ref.ppo_policy_loss(logp.double(), old.double(), adv.double(), mask, loss_agg="token-sum")
    mean, _ = ref.ppo_policy_loss(logp.double(), old.double(), adv.double(), mask, loss_agg="token-mean")
    torch.testing.assert_close(total, mean * mask.sum(), rtol=1e-12, atol=0)


@overflow_ok
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sequence_weights_beyond_exp_range(device, backend, gen):
    """Sequence-level behaviour weights whose log is a sum far beyond float32's exp range (and
    float64's): w overflows to inf or underflows to 0, the cap still applies and the loss, the
    statistics and the gradient stay finite and right."""
    B, T = shape_for(backend)
    logp, old, adv, mask, _ = option_inputs(gen, B, T, device)
    rollout = old - torch.tensor([40.0, 3.0, 0.001, -40.0] + [0.0] * (B - 4), device=device)[:, None]
    for correction in ("tis", "mis"):
        kw = dict(ratio_level="sequence", rollout_logprobs=rollout, is_correction=correction, is_level="sequence")
        loss, stats, grad = run_policy(logp, old, adv, mask, backend, **kw)
        ref_loss, ref_stats, ref_grad, bound, grad_bound = options_reference(logp, old, adv, mask, **kw)
        assert torch.isfinite(loss) and torch.isfinite(stats.packed).all() and torch.isfinite(grad).all()
        assert_loss(loss.cpu(), ref_loss, bound)
        assert_stats_close(stats, ref_stats)
        assert_grad_bounded(grad, ref_grad, grad_bound)
        assert ref_stats["is_capped_frac"] > 0


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_policy_options_defaults_are_the_plain_loss(device, backend, gen):
    """The public defaults are the plain clipped loss of the float64 reference; on the native
    backends the options kernel, with every option at its default, gives bitwise the plain
    kernel's loss, stats and row scales; and options that reduce to the plain loss give it: a
    correction whose weight is exactly 1 (rollout = old, so w = exp(0))."""
    from rlhf_kernels.ops import ppo as ppo_ops
    B, T = shape_for(backend)
    logp, old, adv, mask = policy_inputs(gen, B, T, device)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, loss_agg="seq-mean-token-mean")
    plain = run_policy(logp, old, adv, mask, backend, **kw)
    ref_loss, ref_stats, ref_grad, bound = policy_reference(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), **kw)
    assert_loss(plain[0].cpu(), ref_loss, bound)
    assert_stats_close(plain[1], ref_stats)
    assert_grad(plain[2].cpu(), ref_grad)
    if backend in ("cpu", "cuda"):
        defaults = ppo_ops._policy_options("test", "token", "ppo", None, None)
        args = (logp, old, adv, mask, None, None, 0.2, 0.28, 3.0, ppo_ops._loss_agg_code("test", kw["loss_agg"]))
        for a, b in zip(torch.ops.rlhf_kernels.ppo_policy_fwd(*args),
                        torch.ops.rlhf_kernels.ppo_policy_options_fwd(*args, None, defaults, None)):
            assert torch.equal(a, b)
    exact = device == "cpu"  # a GPU's exp(0) is 1 too, but no test should rest on a fast-math intrinsic
    for level in ("token", "sequence", "geometric"):
        loss, stats, grad = run_policy(logp, old, adv, mask, backend, rollout_logprobs=old, is_correction="tis",
                                       is_level=level, **kw)
        for a, b in ((loss, plain[0]), (stats.packed, plain[1].packed), (grad, plain[2])):
            torch.testing.assert_close(a, b, rtol=0 if exact else 1e-6, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_policy_options_gradient_reaches_logprobs_only(device, backend, gen):
    B, T = shape_for(backend)
    logp, old, adv, mask, rollout = option_inputs(gen, B, T, device)
    leaves = [t.clone().requires_grad_() for t in (logp, old, adv, rollout)]
    loss, _ = rk.ppo_policy_loss(leaves[0], leaves[1], leaves[2], mask, ratio_level="sequence", objective="cispo",
                                 rollout_logprobs=leaves[3], is_correction="mis", backend=backend)
    loss.backward()
    assert leaves[0].grad is not None and leaves[0].grad.abs().sum() > 0
    assert all(t.grad is None for t in leaves[1:])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", ["token-mean", "token-sum"])
def test_policy_options_microbatch_invariance(device, backend, loss_agg, gen):
    """The options are per row (sequence ratio, sequence weights), so micro-batches of rows with
    the global num_tokens (token-mean) or none (token-sum) sum to the full batch."""
    B, T = shape_for(backend)
    logp, old, adv, mask, rollout = option_inputs(gen, B, T, device)
    kw = dict(ratio_level="sequence", rollout_logprobs=rollout, is_correction="tis", is_level="geometric",
              loss_agg=loss_agg)
    if loss_agg == "token-mean":
        kw["num_tokens"] = int(mask.sum())
    full, _, full_grad = run_policy(logp, old, adv, mask, backend, **kw)
    y = logp.clone().requires_grad_()
    total = 0
    for part in (slice(0, B // 2), slice(B // 2, B)):
        loss, _ = rk.ppo_policy_loss(y[part], old[part], adv[part], mask[part], backend=backend,
                                     **dict(kw, rollout_logprobs=rollout[part]))
        total = total + loss
    total.backward()
    ref_loss, _, ref_grad, bound, grad_bound = options_reference(logp, old, adv, mask, **kw)
    for loss, grad in ((full, full_grad), (total, y.grad)):
        assert_loss(loss.cpu(), ref_loss, bound)
        assert_grad_bounded(grad, ref_grad, grad_bound)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_policy_options_deterministic_and_masked_tokens_ignored(device, backend, gen):
    """Bitwise the same on every run, and NaN / inf at masked tokens (of every input, the
    rollout log-probabilities too) change nothing."""
    B, T = shape_for(backend)
    logp, old, adv, mask, rollout = option_inputs(gen, B, T, device)
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    idx = torch.randint(0, 3, (B, T), generator=gen).to(device)
    for o in (OPTION_SETS[9], OPTION_SETS[13], OPTION_SETS[24]):
        def run(poison):
            args = [logp, old, adv, rollout]
            if poison:
                args = [torch.where(mask, a, junk[(idx + k) % 3]) for k, a in enumerate(args)]
            loss, stats, grad = run_policy(args[0], args[1], args[2], mask, backend, **option_kwargs(o, args[3]))
            return [loss, stats.packed, grad]

        clean = run(False)
        for a, b in zip(clean, run(False)):
            assert torch.equal(a, b)
        if backend == "torch":
            continue  # the eager reference's gradient is NaN there (0 * exp(NaN) in autograd), within its row
        for a, b in zip(clean, run(True)):
            assert torch.equal(a, b)


def test_policy_options_empty_batch():
    for backend in _backend.available("cpu"):
        x = torch.empty(0, 5, requires_grad=True)
        loss, stats = rk.ppo_policy_loss(x, x.detach(), x.detach(), torch.zeros(0, 5, dtype=torch.bool),
                                         ratio_level="sequence", rollout_logprobs=x.detach(), is_correction="mis",
                                         is_level="geometric", loss_agg="token-sum", backend=backend)
        loss.backward()
        assert loss.item() == 0 and x.grad.shape == (0, 5)
        assert all(s.item() == 0 for s in stats.values())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_policy_options_all_masked(device, backend, gen):
    B, T = shape_for(backend)
    logp, old, adv, _, rollout = option_inputs(gen, B, T, device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    for o in (OPTION_SETS[9], OPTION_SETS[24]):
        loss, stats, grad = run_policy(logp, old, adv, mask, backend, **option_kwargs(o, rollout, "token-sum"))
        assert loss.item() == 0 and all(s.item() == 0 for s in stats.values())
        assert (grad == 0).all()


@needs_ext
def test_policy_options_thread_count_invariance(gen):
    B, T = 37, 1031
    logp, old, adv, mask, rollout = option_inputs(gen, B, T, "cpu")
    threads = torch.get_num_threads()
    outs = {}
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            outs[n] = [run_policy(logp, old, adv, mask, "cpu", **option_kwargs(o, rollout, "seq-mean-token-mean"))
                       for o in (OPTION_SETS[9], OPTION_SETS[13], OPTION_SETS[24])]
    finally:
        torch.set_num_threads(threads)
    a, b = outs.values()
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert torch.equal(x.packed if hasattr(x, "packed") else x, y.packed if hasattr(y, "packed") else y)


@needs_ext
def test_policy_options_opcheck(gen):
    from rlhf_kernels._layout import pack_options
    B, T = 4, 23
    logp, old, adv, mask, rollout = option_inputs(gen, B, T, "cpu")
    ops = torch.ops.rlhf_kernels
    x = logp.clone().requires_grad_()
    gspo_tis = pack_options(ratio_level=1, is_correction=1, is_level=3)
    cispo_mis = pack_options(objective=1, is_correction=2, is_level=1)
    seq_cispo = pack_options(ratio_level=1, objective=1)
    cases = [(x, old, adv, mask, None, None, 0.2, 0.28, 3.0, 4, rollout, gspo_tis, 1.5),
             (x, old, adv, mask, None, 50.0, 0.2, None, None, 0, rollout, cispo_mis, None),
             (x, old, adv, mask.long(), None, None, 0.2, 0.2, None, 1, None, seq_cispo, None)]
    for args in cases:
        torch.library.opcheck(ops.ppo_policy_options_fwd, args)
        _, _, scale = ops.ppo_policy_options_fwd(*((logp,) + args[1:]))
        bwd_args = (torch.tensor(1.5), logp, old, adv, mask, scale) + args[6:9] + args[10:]
        torch.library.opcheck(ops.ppo_policy_bwd, bwd_args)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_policy_options_compile_fullgraph(gen, device, backend):
    B, T = 4, 37
    logp, old, adv, mask, rollout = option_inputs(gen, B, T, device)

    def step(lp, num_tokens):
        a, sa = rk.ppo_policy_loss(lp, old, adv, mask, ratio_level="sequence", rollout_logprobs=rollout,
                                   is_correction="tis", is_level="geometric", num_tokens=num_tokens, backend=backend)
        b, sb = rk.ppo_policy_loss(lp, old, adv, mask, objective="cispo", rollout_logprobs=rollout,
                                   is_correction="mis", loss_agg="token-sum", backend=backend)
        return a + 0.01 * b, sa["seq_clipfrac"], sb["is_capped_frac"]

    step(logp, None)  # eager first: the backend's modules and ops are loaded
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    nt = torch.tensor(100.0, device=device)
    results = []
    for fn in (step, compiled):
        x = logp.clone().requires_grad_()
        loss, seq_clip, capped = fn(x, nt)
        loss.backward()
        results.append((loss, seq_clip, capped, x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _bad(**kw):
    x = torch.randn(3, 8)
    return dict(logprobs=x, old_logprobs=x + 0.1, advantages=torch.randn(3, 8), mask=torch.rand(3, 8) < 0.7) | kw


ROLLOUT = torch.randn(3, 8)
# (id, keyword arguments, exception type, words the message must contain); test_bad_inputs.py style
OPTION_CASES = [
    ("is_correction without rollout", _bad(is_correction="tis"), ValueError, "rollout_logprobs"),
    ("rollout without is_correction", _bad(rollout_logprobs=ROLLOUT), ValueError, "is_correction"),
    ("is_level without is_correction", _bad(is_level="sequence"), ValueError, "is_level"),
    ("is_cap without is_correction", _bad(is_cap=3.0), ValueError, "is_cap"),
    ("dual_clip with cispo", _bad(objective="cispo", dual_clip=2.0), ValueError, "dual_clip"),
    ("unknown objective", _bad(objective="grpo"), ValueError, "objective"),
    ("unknown ratio_level", _bad(ratio_level="seq"), ValueError, "ratio_level"),
    ("unknown is_correction", _bad(rollout_logprobs=ROLLOUT, is_correction="is"), ValueError, "is_correction"),
    ("unknown is_level", _bad(rollout_logprobs=ROLLOUT, is_correction="tis", is_level="row"), ValueError, "is_level"),
    ("is_cap 1", _bad(rollout_logprobs=ROLLOUT, is_correction="tis", is_cap=1.0), ValueError, "is_cap"),
    ("is_cap inf", _bad(rollout_logprobs=ROLLOUT, is_correction="mis", is_cap=float("inf")), ValueError, "is_cap"),
    ("is_cap str", _bad(rollout_logprobs=ROLLOUT, is_correction="tis", is_cap="2"), TypeError, "is_cap"),
    ("rollout shape", _bad(rollout_logprobs=torch.randn(3, 7), is_correction="tis"), ValueError, "rollout_logprobs"),
    ("rollout int", _bad(rollout_logprobs=torch.ones(3, 8, dtype=torch.long), is_correction="tis"), TypeError,
     "rollout_logprobs"),
    ("rollout list", _bad(rollout_logprobs=[[0.0] * 8] * 3, is_correction="tis"), TypeError, "rollout_logprobs"),
]


@pytest.mark.parametrize("backend", _backend.available("cpu"))
@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_policy_options_bad_inputs(case, backend):
    _, kwargs, kind, words = case
    with pytest.raises(kind) as info:
        rk.ppo_policy_loss(**kwargs, backend=backend)
    assert words in str(info.value), str(info.value)
    assert not isinstance(info.value, rk.BackendUnavailable)


@needs_ext
def test_native_options_codes_are_checked():
    """The native op (ppo_policy_options_fwd) reads `options` with the layout's bit fields: a
    code beyond a field's names is refused naming that field, and bits beyond the fields are."""
    from rlhf_kernels._layout import OPTION_BITS, POLICY_OPTIONS
    x = torch.randn(2, 5)
    m = torch.ones(2, 5, dtype=torch.bool)
    for f, (field, names) in enumerate(POLICY_OPTIONS):
        with pytest.raises(ValueError, match="`%s` code must be" % field):
            torch.ops.rlhf_kernels.ppo_policy_options_fwd(x, x, x, m, None, None, 0.2, None, None, 0, None,
                                                          len(names) << (OPTION_BITS * f), None)
    with pytest.raises(ValueError, match="`options`"):
        torch.ops.rlhf_kernels.ppo_policy_options_fwd(x, x, x, m, None, None, 0.2, None, None, 0, None,
                                                      1 << (OPTION_BITS * len(POLICY_OPTIONS)), None)
