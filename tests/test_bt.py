"""bt_loss and ranking_loss against the float64 reference, on every backend."""

import functools

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend, _ext
from rlhf_kernels.reference import bt as ref
from tests.conftest import device_backends
from rlhf_kernels.tolerances import BT_RTOL
from tests._helpers import assert_grad, assert_loss_close, assert_stats_close

BACKENDS = device_backends()
pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest: torch.empty comes back NaN


assert_loss = functools.partial(assert_loss_close, rtol=BT_RTOL)


def pairs(gen, P, device, spread):
    chosen = spread * torch.randn(P, generator=gen)
    rejected = spread * torch.randn(P, generator=gen)
    return chosen.to(device), rejected.to(device)


def bt_reference(chosen, rejected, margin, eps, cc):
    c = chosen.detach().double().cpu().requires_grad_()
    r = rejected.detach().double().cpu().requires_grad_()
    m = None if margin is None else margin.double().cpu()
    loss, stats = ref.bt_loss(c, r, m, eps, cc)
    loss.backward()
    d = c.detach() - r.detach() - (0 if m is None else m)
    scale = (d.abs() + 1).mean().item() + cc * ((c.detach() + r.detach()) ** 2).mean().item()
    return loss.detach(), stats, c.grad, r.grad, scale


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("with_margin", [False, True], ids=["nomargin", "margin"])
@pytest.mark.parametrize("eps,cc", [(0.0, 0.0), (0.1, 0.01)], ids=["plain", "smooth-center"])
@pytest.mark.parametrize("spread", [1.0, 40.0], ids=["moderate", "large"])
def test_bt_matches_reference(device, backend, with_margin, eps, cc, spread, gen):
    P = 300 if backend == "triton" else 5003
    chosen, rejected = pairs(gen, P, device, spread)
    margin = torch.rand(P, generator=gen).to(device) if with_margin else None
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss, stats = rk.bt_loss(c, r, margin=margin, label_smoothing=eps, center_coef=cc, backend=backend)
    loss.backward()
    ref_loss, ref_stats, ref_dc, ref_dr, scale = bt_reference(chosen, rejected, margin, eps, cc)
    assert_loss(loss, ref_loss, scale)
    assert_stats_close(stats, ref_stats)
    assert_grad(c.grad, ref_dc)
    assert_grad(r.grad, ref_dr)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bt_extreme_and_noncontiguous(device, backend, gen):
    """|d| up to 1e4 must not overflow (log(1 + exp(x)) would), and strided views work."""
    P = 64
    both = (torch.rand(P, 2, generator=gen) - 0.5) * 2e4
    both = both.to(device)
    chosen, rejected = both[:, 0], both[:, 1]
    assert not chosen.is_contiguous()
    cs = torch.empty_strided((P,), (2,), device=device).copy_(chosen).requires_grad_()
    loss, stats = rk.bt_loss(cs, rejected, label_smoothing=0.05, backend=backend)
    loss.backward()
    ref_loss, ref_stats, ref_dc, _, scale = bt_reference(chosen, rejected, None, 0.05, 0.0)
    assert_loss(loss, ref_loss, scale)
    assert_stats_close(stats, ref_stats)
    assert_grad(cs.grad, ref_dc)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bt_empty(device, backend):
    c = torch.empty(0, device=device, requires_grad=True)
    loss, stats = rk.bt_loss(c, c.detach(), backend=backend)
    loss.backward()
    assert loss.item() == 0 and stats["accuracy"].item() == 0 and c.grad.shape == (0,)


def ranking_inputs(gen, P, K, device, ragged):
    rewards = 2 * torch.randn(P, K, generator=gen)
    valid = None
    if ragged:
        lengths = torch.randint(0, K + 1, (P,), generator=gen)
        lengths[0], lengths[1], lengths[2] = 0, 1, K   # no pair, no pair, full
        valid = torch.arange(K)[None, :] < lengths[:, None]
        valid[3, 0] = False if P > 3 and K > 2 else valid[3, 0]  # a hole, not only a prefix
        valid = valid.to(device)
    return rewards.to(device), valid


def ranking_reference(rewards, valid):
    x = rewards.detach().double().cpu().requires_grad_()
    loss, stats = ref.ranking_loss(x, None if valid is None else valid.cpu())
    loss.backward()
    d = x.detach()[:, :, None] - x.detach()[:, None, :]
    scale = (d.abs() + 1).max().item()
    return loss.detach(), stats, x.grad, scale


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("K", [2, 7])
def test_ranking_matches_reference(device, backend, ragged, K, gen):
    P = 9 if backend == "triton" else 257
    rewards, valid = ranking_inputs(gen, P, K, device, ragged)
    x = rewards.clone().requires_grad_()
    loss, stats = rk.ranking_loss(x, valid=valid, backend=backend)
    loss.backward()
    ref_loss, ref_stats, ref_grad, scale = ranking_reference(rewards, valid)
    assert_loss(loss, ref_loss, scale)
    assert_stats_close(stats, ref_stats)
    assert_grad(x.grad, ref_grad)
    if valid is not None:
        assert (x.grad[~valid] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ranking_no_pairs(device, backend, gen):
    rewards = torch.randn(4, 3, generator=gen).to(device).requires_grad_()
    valid = torch.tensor([[True, False, False], [False, False, False], [False, True, False], [False, False, True]],
                         device=device)
    loss, stats = rk.ranking_loss(rewards, valid=valid.to(torch.uint8), backend=backend)
    loss.backward()
    assert loss.item() == 0 and stats["accuracy"].item() == 0 and (rewards.grad == 0).all()


def test_bad_inputs():
    c = torch.randn(5)
    with pytest.raises(ValueError, match=r"`rejected` has shape \[4\]"):
        rk.bt_loss(c, torch.randn(4))
    with pytest.raises(ValueError, match="`chosen` must have 1 dimension"):
        rk.bt_loss(c[None], c[None])
    with pytest.raises(ValueError, match="`margin` has shape"):
        rk.bt_loss(c, c, margin=torch.randn(3))
    with pytest.raises(ValueError, match="`label_smoothing` must be in"):
        rk.bt_loss(c, c, label_smoothing=1.5)
    with pytest.raises(ValueError, match="`center_coef` must be >= 0"):
        rk.bt_loss(c, c, center_coef=-1.0)
    with pytest.raises(TypeError, match="`rejected` must be a floating-point tensor"):
        rk.bt_loss(c, torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="`rewards` must have 2 dimension"):
        rk.ranking_loss(c)
    with pytest.raises(ValueError, match="`valid` has shape"):
        rk.ranking_loss(torch.randn(3, 4), valid=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(_backend.BackendUnavailable, match="cuda"):
        rk.ranking_loss(torch.randn(3, 4), backend="cuda")


needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="native extension not built")


@needs_ext
def test_opcheck(gen):
    ops = torch.ops.rlhf_kernels
    chosen, rejected = pairs(gen, 37, "cpu", 2.0)
    margin = torch.rand(37, generator=gen)
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    for args in [(c, r, margin, 0.1, 0.01), (c, r, None, 0.0, 0.0)]:
        torch.library.opcheck(ops.bt_fwd, args)
    torch.library.opcheck(ops.bt_bwd, (torch.tensor(0.7), chosen, rejected, margin, 0.1, 0.01))
    rewards, valid = ranking_inputs(gen, 6, 5, "cpu", True)
    x = rewards.clone().requires_grad_()
    for args in [(x, valid), (x, None)]:
        torch.library.opcheck(ops.ranking_fwd, args)
    _, _, scale = ops.ranking_fwd(rewards, valid)
    torch.library.opcheck(ops.ranking_bwd, (torch.tensor(1.3), rewards, valid, scale))


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_compile_fullgraph(gen, device, backend):
    chosen, rejected = pairs(gen, 33, device, 2.0)
    rewards, valid = ranking_inputs(gen, 6, 4, device, True)

    def step(c, r, x):
        bl, bs = rk.bt_loss(c, r, label_smoothing=0.1, center_coef=0.01, backend=backend)
        rl, rs = rk.ranking_loss(x, valid=valid, backend=backend)
        return bl + rl, bs["accuracy"], rs["accuracy"]

    step(chosen, rejected, rewards)  # eager first: the backend's modules and ops are loaded
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        c, r, x = chosen.clone().requires_grad_(), rejected.clone().requires_grad_(), rewards.clone().requires_grad_()
        loss, a, b = fn(c, r, x)
        loss.backward()
        results.append((loss, a, b, c.grad, r.grad, x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
