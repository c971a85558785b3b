"""score_loss (regression and ordinal) against the float64 reference, on every backend."""

import functools
import math

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend, _ext
from rlhf_kernels._layout import SCORE_STATS
from rlhf_kernels.reference import score as ref
from tests.conftest import device_backends
from tests.tolerances import SCORE_RTOL
from tests._helpers import assert_grad, assert_loss_close, assert_stats_close

BACKENDS = device_backends()
pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest: torch.empty comes back NaN


assert_loss = functools.partial(assert_loss_close, rtol=SCORE_RTOL)


def assert_stats(actual, expected, kind):
    """The statistics of ``kind`` in their order, close to the reference's, and packed in that order."""
    assert tuple(actual) == SCORE_STATS[kind]
    assert_stats_close(actual, expected)
    assert torch.equal(actual.packed, torch.stack([actual[k] for k in actual]))


def make_thresholds(gen, K, min_gap=0.3):
    """K-1 increasing thresholds, centred near 0, gaps at least ``min_gap``."""
    gaps = min_gap + 1.5 * torch.rand(K - 1, generator=gen)
    t = torch.cumsum(gaps, 0)
    return t - t.mean() + 0.3 * torch.randn((), generator=gen)


def reference(pred, score, kind, thresholds=None):
    """float64 loss, stats and gradients on the (upcast) inputs, and a scale bounding each term."""
    x = pred.detach().double().cpu().requires_grad_()
    t = None if thresholds is None else thresholds.detach().double().cpu().requires_grad_()
    s = score.double().cpu() if kind == "regression" else score.cpu()
    loss, stats = ref.score_loss(x, s, kind, t)
    loss.backward()
    if kind == "regression":
        scale = (0.5 * (x.detach() - s) ** 2).mean().item() + 1e-30
    else:
        y = s.clamp(0, t.shape[0]).long()
        padded = torch.cat([t.detach().new_zeros(1), t.detach().abs(), t.detach().new_zeros(1)])
        scale = (x.detach().abs() + padded[y] + padded[y + 1] + 1).mean().item()
    return loss.detach(), stats, x.grad, (None if t is None else t.grad), scale


def run(pred, score, kind, thresholds, backend, **kw):
    x = pred.clone().requires_grad_()
    t = None if thresholds is None else thresholds.clone().requires_grad_()
    loss, stats = rk.score_loss(x, score, kind=kind, thresholds=t, backend=backend, **kw)
    loss.backward()
    return loss, stats, x.grad, (None if t is None else t.grad)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("spread", [1.0, 40.0], ids=["moderate", "large"])
def test_regression_matches_reference(device, backend, dtype, spread, gen):
    P = 300 if backend == "triton" else 5003
    pred = (spread * torch.randn(P, generator=gen)).to(device, dtype)
    score = torch.randn(P, generator=gen).to(device)
    loss, stats, gx, _ = run(pred, score, "regression", None, backend)
    ref_loss, ref_stats, ref_gx, _, scale = reference(pred, score, "regression")
    assert_loss(loss, ref_loss, scale)
    assert_stats(stats, ref_stats, "regression")
    assert_grad(gx, ref_gx, dtype)
    torch.testing.assert_close(stats["mse"].double(), 2 * loss.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("K", [2, 5, 7, 40])
@pytest.mark.parametrize("spread", [1.0, 30.0], ids=["moderate", "large"])
def test_ordinal_matches_reference(device, backend, K, spread, gen):
    P = 200 if backend == "triton" else 4099
    thresholds = make_thresholds(gen, K)
    pred = spread * torch.randn(P, generator=gen)
    level = torch.randint(0, K, (P,), generator=gen)
    level[:K] = torch.arange(K)  # every level, the two open-ended ones included
    pred, level, thresholds = pred.to(device), level.to(device), thresholds.to(device)
    loss, stats, gx, gt = run(pred, level, "ordinal", thresholds, backend)
    ref_loss, ref_stats, ref_gx, ref_gt, scale = reference(pred, level, "ordinal", thresholds)
    assert_loss(loss, ref_loss, scale)
    assert_stats(stats, ref_stats, "ordinal")
    assert_grad(gx, ref_gx)
    assert_grad(gt, ref_gt)
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("ldtype", [torch.int32, torch.uint8, torch.int64], ids=["i32", "u8", "i64"])
def test_ordinal_level_dtypes_and_low_precision(device, backend, ldtype, gen):
    """Levels of any integer dtype; bf16 pred and fp16 thresholds get gradients in their dtypes."""
    K, P = 6, 97
    thresholds = make_thresholds(gen, K).to(device, torch.float16)
    pred = (2 * torch.randn(P, generator=gen)).to(device, torch.bfloat16)
    level = torch.randint(0, K, (P,), generator=gen).to(device, ldtype)
    loss, stats, gx, gt = run(pred, level, "ordinal", thresholds, backend)
    ref_loss, ref_stats, ref_gx, ref_gt, scale = reference(pred, level, "ordinal", thresholds)
    assert_loss(loss, ref_loss, scale)
    assert_stats(stats, ref_stats, "ordinal")
    assert_grad(gx, ref_gx, torch.bfloat16)
    assert_grad(gt, ref_gt, torch.float16)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ordinal_stable_in_the_tails(device, backend, gen):
    """pred far beyond the thresholds (|pred - t| up to 1e4) and thresholds 1e-3 apart: the
    probability of the true level is then a difference of two sigmoids that both round to 1
    (or 0) in float32; the log-space form keeps the loss and gradients finite and exact."""
    K, P = 5, 64
    thresholds = torch.tensor([-1.0, -0.999, 0.0, 0.001]).to(device)
    pred = ((torch.rand(P, generator=gen) - 0.5) * 2e4).to(device)
    pred[:4] = torch.tensor([0.0005, -0.9995, 20.0, -20.0])
    level = torch.randint(0, K, (P,), generator=gen).to(device)
    level[:4] = torch.tensor([3, 1, 3, 1])
    loss, stats, gx, gt = run(pred, level, "ordinal", thresholds, backend)
    ref_loss, ref_stats, ref_gx, ref_gt, scale = reference(pred, level, "ordinal", thresholds)
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gt).all()
    assert_loss(loss, ref_loss, scale)
    assert_stats(stats, ref_stats, "ordinal")
    assert_grad(gx, ref_gx)
    assert_grad(gt, ref_gt)
    # the naive form underflows to log(0) for some of these in float32 (what the test guards against)
    x, t = pred.float().cpu(), thresholds.float().cpu()
    hi = torch.cat([t, t.new_full((1,), math.inf)])[level.cpu()]
    lo = torch.cat([t.new_full((1,), -math.inf), t])[level.cpu()]
    assert not torch.isfinite(-torch.log(torch.sigmoid(hi - x) - torch.sigmoid(lo - x))).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_noncontiguous(device, backend, gen):
    P, K = 50, 4
    both = torch.randn(P, 2, generator=gen).to(device)
    pred, score = both[:, 0], both[:, 1]
    assert not pred.is_contiguous()
    thresholds = make_thresholds(gen, 2 * K - 1).to(device)[::2]   # [K-1], stride 2
    level = torch.randint(0, K, (P, 2), generator=gen).to(device)[:, 1]
    for kind, s, t in [("regression", score, None), ("ordinal", level, thresholds)]:
        loss, stats, gx, gt = run(pred, s, kind, t, backend)
        ref_loss, ref_stats, ref_gx, ref_gt, scale = reference(pred, s, kind, t)
        assert_loss(loss, ref_loss, scale)
        assert_stats(stats, ref_stats, kind)
        assert_grad(gx, ref_gx)
        if t is not None:
            assert_grad(gt, ref_gt)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_single_level(device, backend, gen):
    """K = 1 (no thresholds): every level is 0, P(level 0) = 1, so the loss is 0 with zero gradient."""
    pred = torch.randn(9, generator=gen).to(device)
    level = torch.zeros(9, dtype=torch.long, device=device)
    loss, stats, gx, gt = run(pred, level, "ordinal", torch.empty(0, device=device), backend)
    assert loss.item() == 0 and stats["accuracy"].item() == 1 and stats["mae"].item() == 0
    assert (gx == 0).all() and gt.shape == (0,)
    with pytest.raises(ValueError, match=r"`score` must hold levels in \[0, K\) = \[0, 1\)"):
        rk.score_loss(pred, level + 1, kind="ordinal", thresholds=torch.empty(0, device=device), backend=backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty(device, backend, gen):
    """An empty batch: loss 0, stats 0, zero gradients (as bt_loss)."""
    t = make_thresholds(gen, 4).to(device)
    for kind, s, th in [("regression", torch.empty(0, device=device), None),
                        ("ordinal", torch.empty(0, dtype=torch.long, device=device), t)]:
        loss, stats, gx, gt = run(torch.empty(0, device=device), s, kind, th, backend)
        assert loss.item() == 0 and (stats.packed == 0).all() and gx.shape == (0,)
        if th is not None:
            assert gt.shape == (3,) and (gt == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_unvalidated_bad_values_stay_confined(device, backend, gen):
    """validate=False: a level outside [0, K) gives a NaN loss and no gradient from its element;
    reversed thresholds give NaN only through the elements whose level lies between them."""
    K, P = 5, 40
    t = make_thresholds(gen, K).to(device)
    pred = torch.randn(P, generator=gen).to(device)
    level = torch.randint(1, K - 1, (P,), generator=gen).to(device)
    bad = level.clone()
    bad[7], bad[8] = K, -1
    loss, _, gx, gt = run(pred, bad, "ordinal", t, backend, validate=False)
    assert torch.isnan(loss)
    assert gx[7] == 0 and gx[8] == 0 and torch.isfinite(gx).all() and torch.isfinite(gt).all()
    keep = torch.ones(P, dtype=torch.bool)
    keep[7:9] = False
    _, _, ref_gx, ref_gt, _ = reference(pred[keep.to(device)], level[keep.to(device)], "ordinal", t)
    assert_grad(gx[keep.to(device)], ref_gx * (P - 2) / P)
    assert_grad(gt, ref_gt * (P - 2) / P)
    with pytest.raises(ValueError, match=r"score\[7\] = 5"):
        rk.score_loss(pred, bad, kind="ordinal", thresholds=t, backend=backend)
    # swap t_1 and t_2: only levels 2 (between them) see a reversed interval
    rev = t.clone()
    rev[1], rev[2] = t[2], t[1]
    level[:3] = torch.tensor([0, 2, 4])
    loss, _, gx, gt = run(pred, level, "ordinal", rev, backend, validate=False)
    assert torch.isnan(loss)
    assert (level == 2).any()
    # d pred = sigmoid(pred - t_y) - sigmoid(t_{y-1} - pred) has no gap term: finite everywhere
    assert torch.isfinite(gx).all()
    with pytest.raises(ValueError, match="`thresholds` must be finite and strictly increasing"):
        rk.score_loss(pred, level, kind="ordinal", thresholds=rev, backend=backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_stats_carry_no_gradient(device, backend, gen):
    x = torch.randn(8, generator=gen).to(device).requires_grad_()
    loss, stats = rk.score_loss(x, torch.randn(8, generator=gen).to(device), backend=backend)
    assert loss.requires_grad and not any(stats[k].requires_grad for k in stats)
    with torch.no_grad():
        loss, _ = rk.score_loss(x, torch.randn(8, generator=gen).to(device), backend=backend)
    assert not loss.requires_grad


def test_bad_arguments():
    x, t = torch.randn(5), torch.tensor([-1.0, 0.0, 1.0])
    y = torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match="`kind` must be one of regression, ordinal"):
        rk.score_loss(x, x, kind="likert")
    with pytest.raises(ValueError, match="`thresholds` is for kind='ordinal'"):
        rk.score_loss(x, x, thresholds=t, backend="torch")
    with pytest.raises(ValueError, match="needs `thresholds`"):
        rk.score_loss(x, y, kind="ordinal", backend="torch")
    with pytest.raises(TypeError, match="`score` must be an integer tensor"):
        rk.score_loss(x, x, kind="ordinal", thresholds=t, backend="torch")
    with pytest.raises(TypeError, match="`score` must be a floating-point tensor"):
        rk.score_loss(x, y, backend="torch")
    with pytest.raises(_backend.BackendUnavailable, match="cuda"):
        rk.score_loss(x, x, backend="cuda")


def test_reference_is_the_cumulative_link_model(gen):
    """The reference's log-space form against the model's definition in float64 on moderate
    inputs: P(level = k) = sigmoid(t_k - x) - sigmoid(t_{k-1} - x) sums to 1 over k, and
    E[level] = sum_k k P(level = k) = sum_k sigmoid(x - t_k)."""
    K, P = 6, 300
    t = make_thresholds(gen, K).double()
    x = 2 * torch.randn(P, generator=gen, dtype=torch.float64)
    cdf = torch.cat([torch.zeros(P, 1, dtype=torch.float64), torch.sigmoid(t[None, :] - x[:, None]),
                     torch.ones(P, 1, dtype=torch.float64)], 1)
    probs = cdf[:, 1:] - cdf[:, :-1]
    logp = ref.level_log_probs(x, t)
    torch.testing.assert_close(logp.exp(), probs, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(P, dtype=torch.float64), rtol=1e-12, atol=0)
    level = torch.randint(0, K, (P,), generator=gen)
    loss, stats = ref.ordinal_loss(x, level, t)
    torch.testing.assert_close(loss, -probs.gather(1, level[:, None]).log().mean(), rtol=1e-12, atol=0)
    expected = (probs * torch.arange(K, dtype=torch.float64)).sum(1)
    torch.testing.assert_close(stats["mae"], (expected - level).abs().mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats["accuracy"], (probs.argmax(1) == level).double().mean(), rtol=0, atol=0)
    torch.testing.assert_close(stats["pred_std"], x.std(unbiased=False), rtol=1e-12, atol=0)


needs_ext = pytest.mark.skipif(not (_ext.loaded() and hasattr(torch.ops.rlhf_kernels, "score_fwd")),
                               reason="native extension (with score_fwd) not built")


@needs_ext
def test_opcheck(gen):
    op = torch.ops.rlhf_kernels.score_fwd
    pred = torch.randn(37, generator=gen)
    t = make_thresholds(gen, 5)
    level = torch.randint(0, 5, (37,), generator=gen)
    x, th = pred.clone().requires_grad_(), t.clone().requires_grad_()
    for args in [(x, torch.randn(37, generator=gen), None, 0, True), (x, level, th, 1, True),
                 (x, level.int(), th, 1, False), (pred.bfloat16().requires_grad_(), level, th.half(), 1, True)]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_compile_fullgraph(gen, device, backend):
    P, K = 33, 5
    pred = torch.randn(P, generator=gen).to(device)
    target = torch.randn(P, generator=gen).to(device)
    level = torch.randint(0, K, (P,), generator=gen).to(device)
    thresholds = make_thresholds(gen, K).to(device)

    def step(x, t):
        rl, rs = rk.score_loss(x, target, backend=backend)
        ol, os_ = rk.score_loss(x, level, kind="ordinal", thresholds=t, backend=backend)
        return rl + 2 * ol, rs["mse"], os_["accuracy"], os_["mae"]

    step(pred, thresholds)  # eager first: the backend's modules and ops are loaded
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x, t = pred.clone().requires_grad_(), thresholds.clone().requires_grad_()
        out = fn(x, t)
        out[0].backward()
        results.append(out + (x.grad, t.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
