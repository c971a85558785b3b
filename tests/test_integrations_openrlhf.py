"""rlhf_kernels.integrations.openrlhf against the installed OpenRLHF: the same outputs and
gradients as OpenRLHF's own functions (rule: tests/test_integrations_kit.py).

OpenRLHF's package imports flash-attn and DeepSpeed model code, so its pure-PyTorch modules
(openrlhf/models/utils.py and loss.py) are loaded from the installed files without the
package's __init__ (test_integrations_kit.load_openrlhf), and the experience maker's two
methods are compiled alone from the installed source (lift_method)."""

import warnings

import pytest
import torch

from rlhf_kernels import tolerances as tol
from test_integrations_kit import (assert_close, assert_grads_close, grad_of, lift_method, load_openrlhf, logits,
                                   mask_with_gaps, policy_inputs, up)

utils, loss_mod = load_openrlhf()
import rlhf_kernels.integrations.openrlhf as rk_openrlhf  # noqa: E402
from rlhf_kernels.integrations import _common  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::rlhf_kernels.integrations.FallThroughWarning")
MAKER = "openrlhf.trainer.ppo_utils.experience_maker"


def uncompiled(fn):
    """OpenRLHF wraps compute_entropy in torch.compile; the function it wraps (same math) spares
    the tests the compile time."""
    return getattr(fn, "__wrapped__", fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits(gen, dtype, temperature):
    z = logits(gen, (3, 8, 211), dtype)
    y = torch.randint(0, 211, (3, 8), generator=gen)
    g = torch.randn(3, 8, generator=gen)

    def run(fn, x):
        x = x.detach().clone().requires_grad_(True)
        scaled = x * 1  # OpenRLHF divides in place: give it a non-leaf, as the model's logits are
        out = fn(scaled, y, temperature)
        return out, scaled.detach(), torch.autograd.grad((out * g.to(out.dtype)).sum(), x)[0]

    lib, ref, ours = run(utils.log_probs_from_logits, z), run(utils.log_probs_from_logits, up(z)), \
        run(rk_openrlhf.log_probs_from_logits, z)
    assert_close(ours[0], lib[0], ref[0], tol.LOGPROB_ATOL)
    assert torch.equal(ours[1], lib[1])  # the caller's logits divided in place, as OpenRLHF does
    assert_grads_close([ours[2]], [lib[2]], [ref[2]])


def test_flash_attn_convention(gen, monkeypatch):
    """Where OpenRLHF takes flash-attn's cross entropy (float32 logits with flash-attn installed;
    not installable here), label -100 is ignored: ours then gives 0 there with no gradient and
    the float64 value elsewhere. OpenRLHF's flash-attn path itself runs only with flash-attn."""
    monkeypatch.setattr(rk_openrlhf, "_flash_ce", True)
    z = logits(gen, (3, 7, 41))
    y = torch.randint(0, 41, (3, 7), generator=gen)
    y[0, 4:] = -100
    keep = y != -100
    ours, (grad,) = grad_of(lambda x: rk_openrlhf.log_probs_from_logits(x * 1, y), z)
    exact = torch.log_softmax(z.double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    assert ours.dtype == torch.float32
    assert torch.all(ours[~keep] == 0) and torch.all(grad[~keep] == 0)
    assert_close(ours[keep], exact[keep].float(), exact[keep], tol.LOGPROB_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compute_entropy(gen, dtype):
    z = logits(gen, (2, 6, 129), dtype)
    g = torch.randn(2, 6, generator=gen)
    fn = uncompiled(utils.compute_entropy)
    lib, lib_grad = grad_of(fn, z, grad_out=g)
    ref, ref_grad = grad_of(fn, up(z), grad_out=g)
    ours, our_grad = grad_of(rk_openrlhf.compute_entropy, z, grad_out=g)
    assert_close(ours, lib, ref, tol.LOGPROB_ATOL)
    assert_grads_close(our_grad, lib_grad, ref_grad)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["plain", "unbiased_gradient"])
@pytest.mark.parametrize("with_old", [False, True], ids=["no_old", "old"])
def test_compute_approx_kl(gen, estimator, unbiased, with_old):
    lp = -torch.rand(4, 40, generator=gen) * 5
    size = torch.logspace(-4, 1.3, 40)[None, :] * torch.sign(torch.randn(4, 40, generator=gen))
    base = lp - size
    old = lp + torch.randn(4, 40, generator=gen) * 2 if with_old else None
    g = torch.randn(4, 40, generator=gen)

    def run(fn, a, b, o):
        return grad_of(lambda x, y: fn(x, y, o, kl_estimator=estimator, unbiased_gradient=unbiased), a, b, grad_out=g)

    lib, lib_grad = run(utils.compute_approx_kl, lp, base, old)
    ref, ref_grad = run(utils.compute_approx_kl, up(lp), up(base), up(old))
    ours, our_grad = run(rk_openrlhf.compute_approx_kl, lp, base, old)
    # OpenRLHF computes in float32 whatever the input (log_probs.float()): float64 inputs give the
    # float32 value, so the float64 reference is the same function on float64 data cast up after
    assert_close(ours, lib, ref.double(), atol=1e-6, rtol=4 * torch.finfo(torch.float32).eps)
    assert_grads_close(our_grad, lib_grad, ref_grad)


AGG = [dict(), dict(dp_size=2, batch_num_tokens=120.0, global_batch_size=9.0),
       dict(batch_num_tokens=torch.tensor(77), global_batch_size=torch.tensor(7))]


@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level", [True, False], ids=["token_level", "seq_level"])
@pytest.mark.parametrize("agg", range(len(AGG)), ids=["local", "global", "global-tensors"])
def test_policy_loss(gen, loss_type, dual_clip, token_level, agg):
    """PolicyLoss with policy_loss_type "ppo" and "gspo" (GSPO forces the sequence-level loss);
    GSPO with advantages that vary within a sequence too: its ratio's gradient is the same."""
    old, lp, adv, m = policy_inputs(gen, mask_dtype=torch.bool)
    fn = loss_mod.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level,
                             policy_loss_type=loss_type)

    def run(forward, old, lp, adv):
        lp = lp.detach().clone().requires_grad_(True)
        out = forward(fn, lp, old, adv, m, None, **AGG[agg])
        return out, torch.autograd.grad(out[0], lp)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error", rk_openrlhf.FallThroughWarning)  # these calls run on our op
        lib = run(loss_mod.PolicyLoss.forward, old, lp, adv)
        ref = run(loss_mod.PolicyLoss.forward, old.double(), lp.double(), adv.double())
        ours = run(rk_openrlhf.policy_loss_forward, old, lp, adv)
    # an upper bound of |l|: without dual clip, tokens with A < 0 and a ratio above 1 + clip are
    # unbounded (ppo: the clamped ratio e^20 makes |l| up to |A| e^20; gspo: the sequence's ratio)
    a = adv.double().abs()
    if loss_type == "gspo":
        seq = ((lp.double() - old.double()) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        bound = a * (3.0 if dual_clip else seq.exp().clamp(min=1.3))
    else:
        bound = a * (3.0 if dual_clip else 1.3)
        bound[0, 0] = abs(adv[0, 0]) * (3.0 if dual_clip else torch.tensor(20.0).exp())
    scale = float(loss_mod.aggregate_loss(bound, m.double(), fn.token_level_loss, **AGG[agg]).abs())
    assert_close(ours[0][0], lib[0][0], ref[0][0], atol=tol.LOSS_RTOL * scale, rtol=tol.LOSS_RTOL, what="loss")
    assert_grads_close([ours[1]], [lib[1]], [ref[1]])
    for i, what in ((1, "clip_ratio"), (2, "ppo_kl")):
        assert_close(ours[0][i], lib[0][i], ref[0][i], atol=tol.STAT_ATOL, rtol=tol.STAT_RTOL, what=what)
    assert ours[0][3] is None and ours[0][4] is None


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False], ids=["token_level", "seq_level"])
@pytest.mark.parametrize("agg", range(len(AGG)), ids=["local", "global", "global-tensors"])
def test_value_loss(gen, clip_eps, token_level, agg):
    B, T = 5, 16
    v_old = torch.randn(B, T, generator=gen)
    v = v_old + torch.randn(B, T, generator=gen) * 0.5
    R = torch.randn(B, T, generator=gen)
    m = mask_with_gaps(gen, B, T, torch.bool)
    fn = loss_mod.ValueLoss(clip_eps=clip_eps, token_level_loss=token_level)

    def run(forward, v, v_old, R):
        v = v.detach().clone().requires_grad_(True)
        out = forward(fn, v, v_old, R, m, **AGG[agg])
        return out, torch.autograd.grad(out, v)[0]

    lib = run(loss_mod.ValueLoss.forward, v, v_old, R)
    ref = run(loss_mod.ValueLoss.forward, v.double(), v_old.double(), R.double())
    ours = run(rk_openrlhf.value_loss_forward, v, v_old, R)
    bound = (v.abs() + v_old.abs() + R.abs() + 0.2).double() ** 2
    scale = float(loss_mod.aggregate_loss(bound, m.double(), token_level, **AGG[agg]).abs())
    assert_close(ours[0], lib[0], ref[0], atol=tol.LOSS_RTOL * scale, rtol=tol.LOSS_RTOL, what="loss")
    assert_grads_close([ours[1]], [lib[1]], [ref[1]])


@pytest.mark.parametrize("gamma,lambd", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
@pytest.mark.parametrize("mask", ["bool", "float", "none"])
def test_gae_and_cumulative_returns(gen, gamma, lambd, mask):
    """Masks with holes: OpenRLHF zeroes the rewards and values there and runs through them."""
    gae = lift_method(MAKER, "RemoteExperienceMaker", "get_advantages_and_returns")
    cumulative = lift_method(MAKER, "RemoteExperienceMaker", "get_cumulative_returns")
    B, T = 4, 29
    r, v = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    m = None if mask == "none" else mask_with_gaps(gen, B, T, torch.bool if mask == "bool" else torch.float32)
    m64 = None if m is None else up(m)
    lib, ref = gae(None, v, r, m, gamma, lambd), gae(None, v.double(), r.double(), m64, gamma, lambd)
    ours = rk_openrlhf.get_advantages_and_returns(None, v, r, m, gamma, lambd)
    for what, o, l, rf in zip(("advantages", "returns"), ours, lib, ref):
        assert_close(o, l, rf, atol=tol.GAE_ATOL * 10, rtol=tol.GAE_RTOL * 10, what=what)
    lib, ref = cumulative(None, r, m, gamma), cumulative(None, r.double(), m64, gamma)
    assert_close(rk_openrlhf.get_cumulative_returns(None, r, m, gamma), lib, ref, atol=tol.GAE_ATOL * 10,
                 rtol=tol.GAE_RTOL * 10, what="returns")


def test_fall_through(gen):
    _common._warned.clear()
    old, lp, adv, m = policy_inputs(gen, mask_dtype=torch.bool)
    tis = loss_mod.PolicyLoss(is_correction_level="token", is_correction_mode="clip")
    rollout = old + torch.randn(old.shape, generator=gen) * 0.5
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = rk_openrlhf.policy_loss_forward(tis, lp, old, adv, m, rollout)
        theirs = loss_mod.PolicyLoss.forward(tis, lp, old, adv, m, rollout)
        assert all(a is b or torch.equal(a, b) for a, b in zip(ours, theirs))
        weights = torch.rand(m.shape, generator=gen) * m
        ppo = loss_mod.PolicyLoss()
        ours = rk_openrlhf.policy_loss_forward(ppo, lp, old, adv, weights)
        assert torch.equal(ours[0], loss_mod.PolicyLoss.forward(ppo, lp, old, adv, weights)[0])
    reasons = [str(w.message) for w in seen if issubclass(w.category, rk_openrlhf.FallThroughWarning)]
    assert len(reasons) == 2 and "is_correction_level='token'" in reasons[0] and "weights tokens" in reasons[1], reasons


def test_patch_swaps_functions_and_methods():
    orig_forward = loss_mod.PolicyLoss.forward
    before = loss_mod.PolicyLoss()  # built before patch(): uses ours too (the method is patched)
    with rk_openrlhf.patch() as handle:
        assert utils.log_probs_from_logits is rk_openrlhf.log_probs_from_logits
        assert utils.compute_approx_kl is rk_openrlhf.compute_approx_kl
        assert loss_mod.PolicyLoss.forward is rk_openrlhf.policy_loss_forward
        assert before.forward.__func__ is rk_openrlhf.policy_loss_forward
        assert "compute_entropy" in handle.replaced
    assert loss_mod.PolicyLoss.forward is orig_forward
    assert utils.log_probs_from_logits is not rk_openrlhf.log_probs_from_logits
