"""rlhf_kernels.integrations.verl against the installed verl: the same outputs and gradients as
verl's own functions (rule: tests/test_integrations_kit.py), fall-through where we do not
implement an option, and patch() swapping them where verl looks them up (its registries too)."""

import warnings

import numpy as np
import pytest
import torch

from rlhf_kernels import tolerances as tol
from test_integrations_kit import (DEVICES, assert_close, assert_grads_close, assert_matmul_grads_close, grad_of,
                                   logits, mask_with_gaps, policy_inputs, require, up)

vf = require("verl.utils.torch_functional")
ca = require("verl.trainer.ppo.core_algos")
import rlhf_kernels.integrations.verl as rk_verl  # noqa: E402
from rlhf_kernels.integrations import _common  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::rlhf_kernels.integrations.FallThroughWarning")
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
MASK_DTYPES = [torch.int64, torch.bool, torch.float32]
LOOP_MASK_DTYPES = [torch.int64, torch.float32]  # verl's GAE and REINFORCE++ loops compute 1 - mask: no bool


def actor_config(**global_batch_info):
    from verl.workers.config import ActorConfig
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                         clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0)
    config.global_batch_info.update(global_batch_info)
    return config


def algo_config(gamma):
    from verl.trainer.config import AlgoConfig
    return AlgoConfig(gamma=gamma)


# ---- logprobs, entropy, KL --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_from_logits(gen, dtype, device):
    z = logits(gen, (3, 7, 263), dtype).to(device)
    y = torch.randint(0, 263, (3, 7), generator=gen).to(device)
    g = torch.randn(3, 7, generator=gen).to(device)
    lib, lib_grad = grad_of(lambda x: vf.logprobs_from_logits(x, y, inplace_backward=False), z, grad_out=g)
    ref, ref_grad = grad_of(lambda x: vf.logprobs_from_logits(x, y, inplace_backward=False), up(z), grad_out=g)
    ours, our_grad = grad_of(lambda x: rk_verl.logprobs_from_logits(x, y, inplace_backward=True), z, grad_out=g)
    assert_close(ours, lib, ref, tol.LOGPROB_ATOL)
    assert_grads_close(our_grad, lib_grad, ref_grad)


def test_logprobs_from_logits_rmpad_and_bad_labels(gen):
    """verl's remove-padding layout: [nnz, V] logits, [nnz] labels; a negative label raises in
    both (verl's gather without flash-attn; ours validates)."""
    z = logits(gen, (29, 64))
    y = torch.randint(0, 64, (29,), generator=gen)
    assert_close(rk_verl.logprobs_from_logits(z, y), vf.logprobs_from_logits(z, y),
                 vf.logprobs_from_logits(z.double(), y), tol.LOGPROB_ATOL)
    y[3] = -100
    with pytest.raises(RuntimeError):
        vf.logprobs_from_logits(z, y)
    with pytest.raises(ValueError, match="labels"):
        rk_verl.logprobs_from_logits(z, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flash_attn_conventions(gen, dtype, monkeypatch):
    """Where verl takes flash-attn's cross entropy (not installable here: a CUDA build), label
    -100 is ignored: ours then gives 0 there with no gradient, float32 log-probabilities, and the
    float64 value elsewhere, in logprobs_from_logits and the fused LM head. verl's flash-attn
    path itself runs only where flash-attn is installed."""
    monkeypatch.setattr(vf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    monkeypatch.delenv("VERL_DISABLE_FLASH_ATTN_CE", raising=False)
    z = logits(gen, (4, 9, 53), dtype)
    y = torch.randint(0, 53, (4, 9), generator=gen)
    y[1, 2:5] = -100
    y[3, :] = -100
    keep = y != -100
    ours, (grad,) = grad_of(lambda x: rk_verl.logprobs_from_logits(x, y, inplace_backward=False), z)
    exact = torch.log_softmax(z.double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    assert ours.dtype == torch.float32
    assert torch.all(ours[~keep] == 0) and torch.all(grad[~keep] == 0)
    assert_close(ours[keep], exact[keep].float(), exact[keep], tol.LOGPROB_ATOL)

    tfx = require("verl.utils.experimental.torch_functional")
    monkeypatch.setattr(tfx, "_FLASH_ATTN_CROSS_ENTROPY_AVAILABLE", True)
    h, w = torch.randn(4, 9, 16, generator=gen).to(dtype), (torch.randn(53, 16, generator=gen) / 3).to(dtype)
    (logp, ent), (gh, gw) = grad_of(lambda a, b: rk_verl.fused_linear_for_ppo_forward(tfx.FusedLinearForPPO(), a, b,
                                                                                        y, 0.8), h, w)
    ref_logp, ref_ent = float64_head(h, w, y.clamp(min=0), 0.8)
    assert torch.all(logp[~keep] == 0) and torch.all(gh[~keep] == 0)
    assert_close(logp[keep], ref_logp[keep].float(), ref_logp[keep], tol.LOGPROB_ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_entropy_from_logits(gen, dtype):
    z = logits(gen, (2, 9, 151), dtype)
    g = torch.randn(2, 9, generator=gen)
    lib, lib_grad = grad_of(vf.entropy_from_logits, z, grad_out=g)
    ref, ref_grad = grad_of(vf.entropy_from_logits, up(z), grad_out=g)
    ours, our_grad = grad_of(rk_verl.entropy_from_logits, z, grad_out=g)
    assert_close(ours, lib, ref, tol.LOGPROB_ATOL)
    assert_grads_close(our_grad, lib_grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_entropy_from_logits_with_chunking(gen, dtype):
    z = logits(gen, (37, 101), dtype)
    g = torch.randn(37, generator=gen)
    lib, lib_grad = grad_of(lambda x: vf.entropy_from_logits_with_chunking(x, chunk_size=8), z, grad_out=g)
    ref, ref_grad = grad_of(lambda x: vf.entropy_from_logits(x), up(z), grad_out=g)
    ours, our_grad = grad_of(lambda x: rk_verl.entropy_from_logits_with_chunking(x, chunk_size=8), z, grad_out=g)
    assert_close(ours, lib, ref, tol.LOGPROB_ATOL)
    assert_grads_close(our_grad, lib_grad, ref_grad)


def float64_head(hidden, weight, labels, temperature):
    """The fused head's math in float64: log softmax and entropy of (h W^T) / T at ``labels``."""
    z = hidden.double() @ weight.double().T / temperature
    logp_all = torch.log_softmax(z, -1)
    return logp_all.gather(-1, labels[..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37,), (3, 11)], ids=["rmpad", "batch"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_for_ppo(gen, dtype, shape, temperature, device):
    """verl's fused LM head (use_fused_kernels, backend "torch"): [N, H] or [B, T, H] hidden states.
    verl rounds the logits to the hidden states' dtype before its float32 softmax, ours does not:
    held to float64, with verl's own error as the allowance (the rules of test_integrations_kit)."""
    fused = require("verl.utils.experimental.torch_functional").FusedLinearForPPO(chunk_size=16)
    H, V = 24, 263
    h = torch.randn(*shape, H, generator=gen).to(device, dtype)
    w = (torch.randn(V, H, generator=gen) / 3).to(device, dtype)
    y = torch.randint(0, V, shape, generator=gen).to(device)
    g_logp, g_ent = torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device)

    def run(forward, hh, ww):
        hh, ww = hh.detach().clone().requires_grad_(True), ww.detach().clone().requires_grad_(True)
        logp, ent = float64_head(hh, ww, y, temperature) if forward is None else forward(fused, hh, ww, y, temperature)
        loss = (logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()
        return logp, ent, torch.autograd.grad(loss, [hh, ww])

    with warnings.catch_warnings():
        warnings.simplefilter("error", rk_verl.FallThroughWarning)
        lib, ours = run(type(fused).forward, h, w), run(rk_verl.fused_linear_for_ppo_forward, h, w)
    ref = run(None, h, w)
    assert ours[0].dtype == lib[0].dtype == torch.float32 and ours[1].dtype == lib[1].dtype == dtype
    assert_close(ours[0], lib[0], ref[0], tol.LOGPROB_ATOL, what="logp")
    assert_close(ours[1], lib[1], ref[1], tol.LOGPROB_ATOL, what="entropy")
    assert_matmul_grads_close(ours[2], lib[2], ref[2])


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_penalty(gen, name, dtype):
    """Log ratios from 1e-4 to 25 in size: k3's clamp at 10 and its small-ratio regime (where
    verl's exp(x) - x - 1 cancels and ours does not: held to float64)."""
    lp = (-torch.rand(4, 50, generator=gen) * 5).to(dtype)
    size = torch.logspace(-4, 1.4, 50)[None, :] * torch.sign(torch.randn(4, 50, generator=gen))
    ref_lp = (lp.float() - size).to(dtype)
    g = torch.randn(4, 50, generator=gen)
    for fn_lib, fn_ours in [(ca.kl_penalty, rk_verl.kl_penalty), (ca.kl_penalty_forward, rk_verl.kl_penalty_forward)]:
        if name.endswith("+") and fn_lib is ca.kl_penalty_forward:
            continue
        lib, lib_grad = grad_of(lambda a, b: fn_lib(a, b, name), lp, ref_lp, grad_out=g)
        ref, ref_grad = grad_of(lambda a, b: fn_lib(a, b, name), up(lp), up(ref_lp), grad_out=g)
        ours, our_grad = grad_of(lambda a, b: fn_ours(a, b, name), lp, ref_lp, grad_out=g)
        assert_close(ours, lib, ref, atol=1e-6, rtol=4 * torch.finfo(torch.float32).eps)
        assert_grads_close(our_grad, lib_grad, ref_grad)


def test_kl_penalty_full_raises_as_verl():
    x = torch.zeros(2, 3)
    with pytest.raises(NotImplementedError):
        rk_verl.kl_penalty(x, x, "full")


# ---- advantages ------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_dtype", LOOP_MASK_DTYPES, ids=str)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.5)])
@pytest.mark.parametrize("device", DEVICES)
def test_gae(gen, mask_dtype, gamma, lam, device):
    """Masks with holes and a fully masked row: masked steps carry the next step's advantage,
    whitened with the statistics of the response tokens, as verl's loop does."""
    B, T = 5, 33
    r, v = torch.randn(B, T, generator=gen).to(device), torch.randn(B, T, generator=gen).to(device)
    m = mask_with_gaps(gen, B, T, mask_dtype).to(device)
    lib = ca.compute_gae_advantage_return(r, v, m, gamma, lam)
    ref = ca.compute_gae_advantage_return(r.double(), v.double(), m.double(), gamma, lam)
    ours = rk_verl.compute_gae_advantage_return(r, v, m, gamma, lam)
    for what, o, l, rf in zip(("advantages", "returns"), ours, lib, ref):
        assert_close(o, l, rf, atol=tol.GAE_ATOL * 10, rtol=tol.GAE_RTOL * 10, what=what)


def uid_index(gen, B, sizes=(4, 3, 1, 5, 2)):
    """verl's index: a numpy object array of uid strings, groups of the given sizes (one of
    size 1), shuffled so a group's members are not adjacent."""
    ids = np.array(sum([["uid-%d" % g] * n for g, n in enumerate(sizes)], []), dtype=object)
    assert len(ids) == B
    return ids[torch.randperm(B, generator=gen).numpy()]


OUTCOME = [
    ("compute_grpo_outcome_advantage", {}),
    ("compute_grpo_outcome_advantage", {"norm_adv_by_std_in_grpo": False}),
    ("compute_grpo_outcome_advantage", {"epsilon": 1e-3}),
    ("compute_grpo_vectorized_outcome_advantage", {}),
    ("compute_grpo_vectorized_outcome_advantage", {"norm_adv_by_std_in_grpo": False}),
    ("compute_rloo_outcome_advantage", {}),
    ("compute_rloo_vectorized_outcome_advantage", {}),
    ("compute_reinforce_plus_plus_baseline_outcome_advantage", {}),
]


@pytest.mark.parametrize("name,kwargs", OUTCOME, ids=["%s%s" % (n.replace("compute_", "").replace(
    "_outcome_advantage", ""), "-" + "-".join(k) if k else "") for n, k in OUTCOME])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_outcome_advantages(gen, name, kwargs, mask_dtype, device):
    B, T = 15, 11
    rewards = torch.zeros(B, T)
    m = mask_with_gaps(gen, B, T, mask_dtype)
    m[:, 0] = 1  # every response has a token: the score sits at its last one
    last = T - 1 - m.long().flip(-1).argmax(-1)
    rewards[torch.arange(B), last] = torch.randn(B, generator=gen) * 2
    index = uid_index(gen, B)
    rewards, m = rewards.to(device), m.to(device)
    lib = getattr(ca, name)(rewards, m, index, **kwargs)
    ref = getattr(ca, name)(rewards.double(), m.double(), index, **kwargs)
    ours = getattr(rk_verl, name)(rewards, m, index, **kwargs)
    assert ours[0] is ours[1]  # verl returns one tensor twice
    # float64 group statistics; verl's vectorized GRPO computes its variance as sum2 - sum^2/n in float32
    assert_close(ours[0], lib[0], ref[0], atol=1e-6, rtol=1e-5)


def test_outcome_advantages_integer_tensor_index(gen):
    B, T = 8, 4
    rewards, m = torch.randn(B, T, generator=gen), torch.ones(B, T, dtype=torch.int64)
    index = torch.tensor([7, 3, 7, 3, 9, 9, 9, 3])
    lib = ca.compute_grpo_vectorized_outcome_advantage(rewards, m, index)
    ours = rk_verl.compute_grpo_vectorized_outcome_advantage(rewards, m, index)
    ref = ca.compute_grpo_vectorized_outcome_advantage(rewards.double(), m.double(), index)
    assert_close(ours[0], lib[0], ref[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("mask_dtype", LOOP_MASK_DTYPES, ids=str)
def test_reinforce_plus_plus(gen, gamma, mask_dtype):
    B, T = 6, 17
    r = torch.randn(B, T, generator=gen)
    m = mask_with_gaps(gen, B, T, mask_dtype)
    cfg = algo_config(gamma)
    lib = ca.compute_reinforce_plus_plus_outcome_advantage(r, m, config=cfg)
    ref = ca.compute_reinforce_plus_plus_outcome_advantage(r.double(), m.double(), config=cfg)
    ours = rk_verl.compute_reinforce_plus_plus_outcome_advantage(r, m, config=cfg)
    for what, o, l, rf in zip(("advantages", "returns"), ours, lib, ref):
        assert_close(o, l, rf, atol=1e-5, rtol=1e-5, what=what)


def test_whitening_of_fewer_than_two_tokens_raises_as_verl(gen):
    r, v = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    m = torch.zeros(2, 5, dtype=torch.int64)
    m[0, 3] = 1
    with pytest.raises(ValueError, match="sum of the mask is one"):
        rk_verl.compute_gae_advantage_return(r, v, m, 1.0, 0.95)


# ---- losses ----------------------------------------------------------------------------------

GLOBAL_INFO = [{}, {"dp_size": 2, "batch_num_tokens": 150, "global_batch_size": 11, "loss_scale_factor": 32},
               {"dp_size": 1, "batch_num_tokens": torch.tensor(97), "global_batch_size": torch.tensor(9.0)}]


def loss_bound(loss_mode, old, lp, adv, m):
    """An upper bound of each token's |l| (float64), for the loss's absolute tolerance."""
    a = adv.double().abs()
    if loss_mode == "vanilla":  # dual clip: |l| <= 3 |A|
        return 3 * a
    if loss_mode == "cispo":  # |l| = clip(ratio) |A| |logp|, ratio clipped to at most 1.28
        return 1.28 * a * lp.double().abs()
    n = m.double().sum(-1, keepdim=True).clamp(min=1)
    seq = ((lp.double() - old.double()) * m.double()).sum(-1, keepdim=True) / n
    return a * seq.exp().clamp(min=1.28)


def outcome_advantages(gen, adv, m):
    """GSPO's advantages: one number per sequence over its response tokens (verl's outcome
    estimators), where verl's GSPO gradient and the sequence ratio's agree."""
    return (torch.randn(adv.shape[0], 1, generator=gen).to(adv.device, adv.dtype) * m).expand_as(adv).contiguous()


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo", "cispo"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", range(len(GLOBAL_INFO)), ids=["local", "global", "global-tensors"])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_policy_loss(gen, loss_mode, mode, info, mask_dtype, device):
    """verl's registered policy losses "vanilla", "gspo" and "cispo", every agg_loss mode."""
    old, lp, adv, m = policy_inputs(gen, mask_dtype=mask_dtype, device=device)
    if loss_mode == "gspo":
        adv = outcome_advantages(gen, adv, m)
    cfg = actor_config(**GLOBAL_INFO[info])
    theirs, ours_fn = ca.get_policy_loss_fn(loss_mode), getattr(rk_verl, "compute_policy_loss_" + loss_mode)
    assert theirs is getattr(ca, "compute_policy_loss_" + loss_mode)

    def run(fn, old, lp, adv):
        lp = lp.detach().clone().requires_grad_(True)
        loss, metrics = fn(old, lp, adv, m, loss_agg_mode=mode, config=cfg)
        return loss, torch.autograd.grad(loss, lp)[0], metrics

    with warnings.catch_warnings():
        warnings.simplefilter("error", rk_verl.FallThroughWarning)  # these calls run on our op
        lib, ref, ours = run(theirs, old, lp, adv), run(theirs, old.double(), lp.double(), adv.double()), \
            run(ours_fn, old, lp, adv)
    # relative to the aggregate of an upper bound of |l|, as tests/test_ppo.py
    scale = float(ca.agg_loss(loss_bound(loss_mode, old, lp, adv, m), m.double(), mode, **GLOBAL_INFO[info]).abs())
    assert_close(ours[0], lib[0], ref[0], atol=tol.LOSS_RTOL * scale, rtol=tol.LOSS_RTOL, what="loss")
    assert_grads_close([ours[1]], [lib[1]], [ref[1]])
    assert set(ours[2]) == set(lib[2])
    for k, v in ours[2].items():
        assert isinstance(v, float)
        assert abs(v - ref[2][k]) <= tol.STAT_ATOL + tol.STAT_RTOL * abs(ref[2][k]) + 2 * abs(lib[2][k] - ref[2][k]), k


def test_gspo_with_token_advantages_falls_through(gen):
    """verl's GSPO gives each token the sequence ratio's gradient as its own; with advantages that
    vary within a sequence that differs from the gradient of the sequence ratio: verl's runs."""
    _common._warned.clear()
    old, lp, adv, m = policy_inputs(gen)
    with pytest.warns(rk_verl.FallThroughWarning, match="vary within a sequence"):
        ours = rk_verl.compute_policy_loss_gspo(old, lp, adv, m, config=actor_config())
    theirs = ca.compute_policy_loss_gspo(old, lp, adv, m, config=actor_config())
    assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1]


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", range(len(GLOBAL_INFO)), ids=["local", "global", "global-tensors"])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_value_loss(gen, mode, info, mask_dtype, device):
    B, T = 5, 16
    v_old = torch.randn(B, T, generator=gen).to(device)
    v = v_old + torch.randn(B, T, generator=gen).to(device) * 0.5
    R = torch.randn(B, T, generator=gen).to(device)
    m = mask_with_gaps(gen, B, T, mask_dtype).to(device)
    kw = dict(loss_agg_mode=mode, **GLOBAL_INFO[info])

    def run(fn, v, R, v_old):
        v = v.detach().clone().requires_grad_(True)
        loss, clipfrac = fn(v, R, v_old, m, 0.2, **kw)
        return loss, torch.autograd.grad(loss, v)[0], clipfrac

    lib, ref, ours = run(ca.compute_value_loss, v, R, v_old), \
        run(ca.compute_value_loss, v.double(), R.double(), v_old.double()), run(rk_verl.compute_value_loss, v, R, v_old)
    bound = (v.abs() + v_old.abs() + R.abs() + 0.2).double() ** 2  # >= both squared errors
    scale = float(ca.agg_loss(bound, m.double(), mode, **GLOBAL_INFO[info]).abs())
    assert_close(ours[0], lib[0], ref[0], atol=tol.LOSS_RTOL * scale, rtol=tol.LOSS_RTOL, what="loss")
    assert_grads_close([ours[1]], [lib[1]], [ref[1]])
    assert_close(ours[2], lib[2], ref[2], atol=tol.STAT_ATOL, rtol=tol.STAT_RTOL, what="vf_clipfrac")


def test_empty_micro_batch_gives_zero_not_nan(gen):
    """The one documented difference: no response token and no global count -> verl NaN, ours 0."""
    old, lp, adv, m = policy_inputs(gen)
    m.zero_()
    lp.requires_grad_(True)
    loss, _ = rk_verl.compute_policy_loss_vanilla(old, lp, adv, m, config=actor_config())
    assert loss.item() == 0 and torch.all(torch.autograd.grad(loss, lp)[0] == 0)
    assert torch.isnan(ca.compute_policy_loss_vanilla(old, lp, adv, m, config=actor_config())[0])


def test_fall_through(gen):
    _common._warned.clear()
    old, lp, adv, m = policy_inputs(gen)
    weights = torch.rand(m.shape, generator=gen) * m
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = rk_verl.compute_policy_loss_vanilla(old, lp, adv, weights, config=actor_config())
        theirs = ca.compute_policy_loss_vanilla(old, lp, adv, weights, config=actor_config())
        assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1]
        w = torch.rand(m.shape, generator=gen)
        ours = rk_verl.compute_policy_loss_vanilla(old, lp, adv, m, config=actor_config(), rollout_is_weights=w)
        assert torch.equal(ours[0], ca.compute_policy_loss_vanilla(old, lp, adv, m, config=actor_config(),
                                                                   rollout_is_weights=w)[0])
        ours = rk_verl.compute_gae_advantage_return(adv, old, weights, 1.0, 0.9)
        assert torch.equal(ours[0], ca.compute_gae_advantage_return(adv, old, weights, 1.0, 0.9)[0])
        assert torch.equal(rk_verl.kl_penalty(lp.double(), old.double(), "k3"), ca.kl_penalty(lp.double(),
                                                                                            old.double(), "k3"))
    reasons = [str(w.message) for w in seen if issubclass(w.category, rk_verl.FallThroughWarning)]
    assert len(reasons) == 4, reasons
    assert "weights tokens" in reasons[0] and "rollout_is_weights" in reasons[1]


def test_patch_swaps_module_attributes_and_registries():
    orig_loss = ca.get_policy_loss_fn("vanilla")
    orig_grpo = ca.get_adv_estimator_fn("grpo")
    orig_gae = ca.compute_gae_advantage_return
    with rk_verl.patch() as handle:
        assert ca.get_policy_loss_fn("vanilla") is rk_verl.compute_policy_loss_vanilla
        assert ca.get_adv_estimator_fn("grpo") is rk_verl.compute_grpo_outcome_advantage
        assert ca.get_adv_estimator_fn("gae") is rk_verl.compute_gae_advantage_return
        assert ca.compute_gae_advantage_return is rk_verl.compute_gae_advantage_return
        assert vf.logprobs_from_logits is rk_verl.logprobs_from_logits
        fused = require("verl.utils.experimental.torch_functional").FusedLinearForPPO
        assert fused.forward is rk_verl.fused_linear_for_ppo_forward
        assert handle.replaced["compute_policy_loss_vanilla"] == 2  # the module attribute and the registry
    assert ca.get_policy_loss_fn("vanilla") is orig_loss
    assert ca.get_adv_estimator_fn("grpo") is orig_grpo
    assert ca.compute_gae_advantage_return is orig_gae
    assert ca.get_policy_loss_fn("gspo") is ca.POLICY_LOSS_REGISTRY["gspo"]
    assert fused.forward is not rk_verl.fused_linear_for_ppo_forward
