"""linear_policy family: linear_policy_loss (LM head + PPO policy loss + entropy + KL, gradients
made in the forward).

Every backend is compared with the float64 evaluation of the reference on the same (upcast)
inputs: ``token_logprobs(hidden @ weight.T + bias, labels)`` through the whole logits, then
ppo_policy_loss, the entropy term and kl_penalty (rlhf_kernels/reference/linear_policy.py).
- logp (stats["logprobs"]): LOGPROB_ATOL plus float32 output ulps plus the bound of the float32
  matmul's error, as linear_token_logprobs (the torch backend multiplies in the input dtype, so
  in 16-bit it is compared with the float64 evaluation of its own rounded logits);
- the loss: that per-token bound carried through the loss's exact sensitivity to each token's
  logp and entropy (twice the first-order term), plus LOSS_RTOL of its size;
- the policy statistics: exactly ppo_policy_loss's on the returned logp (same backend); entropy
  and kl means: the per-token bound, plus STAT_RTOL / STAT_ATOL;
- gradients wrt hidden, weight and bias: no worse than twice PyTorch's own error in that dtype
  (the reference run in the input dtype), plus GRAD_ULPS of the largest entry.
Each case also runs with a tiny tile budget, so that chunks of one or a few rows are exercised.
"""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import tolerances as tol
from conftest import device_backends, native_devices, needs_native
from rlhf_kernels import _layout
from rlhf_kernels.ops import linear_policy as lp_ops
from rlhf_kernels.reference import linear_policy as ref
from rlhf_kernels.reference import logprobs as ref_lp
from tests._helpers import skip_unsupported, tile_fixture

BACKENDS = device_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 0: the backend's default (one chunk at these sizes); 300: one row per chunk for V >= 151
# (tile // V rows, at least one), a few rows per chunk below
TILES = [0, 300]
pytestmark = pytest.mark.usefixtures("poison_empty")  # conftest: torch.empty comes back NaN
F64 = torch.float64


tile = tile_fixture(lp_ops, TILES, "linear_policy_loss's chunk budget, from TILES")


def _head(gen, B, T, H, V, dtype, device, bias=True, scale=3.0):
    """hidden [B, T, H], weight [V, H], bias [V]: logits of standard deviation about ``scale``."""
    h = torch.randn(B, T, H, generator=gen, dtype=F64)
    w = torch.randn(V, H, generator=gen, dtype=F64) * (scale / H ** 0.5)
    b = torch.randn(V, generator=gen, dtype=F64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(w), cast(b)


def _mask(gen, B, T, device, frac=0.8):
    m = torch.rand(B, T, generator=gen) < frac
    if B > 1:
        m[1] = False         # a fully masked row
    m[0, -(T // 3):] = False  # right padding (nothing for T < 3)
    return m.to(device)


def _batch(gen, h, w, b, mask, temperature=1.0):
    """labels [B, T] (garbage where masked: -100, V, -7), old_logprobs and ref_logprobs near the
    exact logp (ratios on both sides of the clip range), advantages of both signs."""
    B, T, _ = h.shape
    V = w.shape[0]
    y = torch.randint(0, V, (B, T), generator=gen)
    junk = torch.tensor([-100, V, -7, V + 1000])[torch.randint(0, 4, (B, T), generator=gen)]
    y = torch.where(mask.cpu(), y, junk).to(mask.device)
    logp = _exact(h, w, b, y, torch.zeros(B, T, dtype=F64, device=mask.device), torch.zeros_like(mask, dtype=F64),
                  mask, temperature=temperature)[2]
    old = (logp + 0.3 * torch.randn(B, T, generator=gen, dtype=F64).to(mask.device)).float()
    ref_lp_ = (logp + 0.2 * torch.randn(B, T, generator=gen, dtype=F64).to(mask.device)).float()
    adv = (2 * torch.randn(B, T, generator=gen)).to(mask.device)
    return y, old, adv, ref_lp_


def _up(t):
    return None if t is None else t.double()


def _exact(h, w, b, y, old, adv, mask, ref_logprobs=None, **kw):
    """The float64 reference: (loss, stats, logp, (d_hidden, d_weight, d_bias), d_logits [B, T, V])."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (h, w, b)]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if b is not None else 0)
    logits.retain_grad()
    loss, stats, logp = ref.logits_policy_loss(logits, y, old.double(), adv.double(), mask,
                                               ref_logprobs=_up(ref_logprobs), **kw)
    loss.backward()
    return loss.detach(), stats, logp, [None if t is None else t.grad for t in leaves], logits.grad


def _own_grads(h, w, b, y, old, adv, mask, ref_logprobs=None, **kw):
    """PyTorch's own gradients in the input dtype (the reference run there)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    loss, _, _ = ref.linear_policy_loss(leaves[0], leaves[1], y, old.to(h.dtype), adv.to(h.dtype), mask,
                                        bias=leaves[2],
                                        ref_logprobs=None if ref_logprobs is None else ref_logprobs.to(h.dtype), **kw)
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


def _ours(backend, h, w, b, y, old, adv, mask, ref_logprobs=None, upstream=1.0, **kw):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    loss, stats = rk.linear_policy_loss(leaves[0], leaves[1], y, old, adv, mask, bias=leaves[2],
                                        ref_logprobs=ref_logprobs, backend=backend, **kw)
    (loss * upstream).backward()
    return loss.detach(), stats, [None if t is None else t.grad for t in leaves]


def _matmul_err(h, w, b, temperature):
    """Per token, the worst-case error that forming the logits in float32 can add to logp or H
    (as in test_linear_logprobs.py: gamma_H (|h| . |w_j|), twice, over T)."""
    H = h.shape[-1]
    u = 2.0 ** -24
    gamma = H * u / (1 - H * u)
    mag = h.double().abs() @ w.double().abs().T + (b.double().abs() if b is not None else 0)
    return 2 * gamma * mag.amax(-1) / temperature


def _token_bound(exact_logp, extra):
    return tol.LOGPROB_ATOL + tol.LOGPROB_OUTPUT_ULPS * torch.finfo(torch.float32).eps * exact_logp.abs() + extra


def _loss_bound(logp64, ent64, old, adv, mask, ref_logprobs, e, kw):
    """Twice the first-order effect of a per-token error e in logp and entropy on the loss (its
    exact sensitivity, from the float64 reference), plus LOSS_RTOL of the loss's size."""
    lp = logp64.detach().clone().requires_grad_(True)
    en = ent64.detach().clone().requires_grad_(True)
    opts = {k: x for k, x in kw.items() if k != "temperature"}
    loss, _ = ref.policy_head_loss(lp, en, old.double(), adv.double(), mask, _up(ref_logprobs), **opts)
    g_lp, g_en = torch.autograd.grad(loss, (lp, en), allow_unused=True)
    first = ((g_lp.abs() + (g_en.abs() if g_en is not None else 0)) * e).sum()
    return 2 * first.item() + tol.LOSS_RTOL * (abs(loss.item()) + 1.0)


def _off_branch_edges(h, w, b, y, old, mask, kw, margin=0.03):
    """old_logprobs moved (log-ratio up by 2.5 margin) where a token's ratio (its row's, for the
    sequence-level ratio) is within `margin` in log of a branch edge of the loss (1 - clip_low,
    1 + clip_high, dual_clip): a 16-bit backend's logp error (up to ~1e-2) then cannot flip a
    branch, which no error bound covers."""
    clip_low = kw.get("clip_low", 0.2)
    clip_high = kw.get("clip_high") if kw.get("clip_high") is not None else clip_low
    edges = [e for e in (1 - clip_low, 1 + clip_high, kw.get("dual_clip")) if e]
    m = mask.bool()
    logits = h.double() @ w.double().T + (b.double() if b is not None else 0)
    logp = ref_lp.token_logprobs(logits, torch.where(m, y.long(), 0), kw.get("temperature", 1.0))[0]
    x = logp - old.double()
    if kw.get("ratio_level") == "sequence":
        x = (torch.where(m, x, 0).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(x)
    near = ((x[..., None] - torch.log(torch.tensor(edges, dtype=F64, device=x.device))).abs() < margin).any(-1) & m
    if kw.get("ratio_level") == "sequence":
        near = near.any(-1, keepdim=True).expand_as(near)
    return torch.where(near, old - 2.5 * margin, old).to(old.dtype)


def _check(device, backend, h, w, b, y, old, adv, mask, ref_logprobs=None, **kw):
    """Values, statistics and gradients of one call against the float64 reference; returns ours."""
    temperature = kw.get("temperature", 1.0)
    old = _off_branch_edges(h, w, b, y, old, mask, kw)
    loss, stats, grads = _ours(backend, h, w, b, y, old, adv, mask, ref_logprobs, **kw)
    mask = mask.bool()  # the op takes integer masks too
    loss64, stats64, logp64, grads64, dz64 = _exact(h, w, b, y, old, adv, mask, ref_logprobs, **kw)
    logp_exact = logp64
    assert loss.dtype == torch.float32 and loss.dim() == 0
    logp = stats["logprobs"]
    assert logp.dtype == torch.float32 and logp.shape == mask.shape and not logp.requires_grad
    assert (logp[~mask] == 0).all()
    valid = mask
    if backend == "torch" and h.dtype != torch.float32:
        # the torch backend's logits are hidden @ weight.T (+ bias) rounded to the input dtype
        logits = (h @ w.T + (b if b is not None else 0)).double()
        yy = torch.where(mask, y.long(), 0)
        logp64, ent64 = ref_lp.token_logprobs(logits, yy, temperature)
        logp64, ent64 = logp64.masked_fill(~mask, 0), ent64.masked_fill(~mask, 0)
        extra = torch.zeros_like(logp64)
    else:
        logits = h.double() @ w.double().T + (b.double() if b is not None else 0)
        ent64 = ref_lp.token_entropy(logits, temperature).masked_fill(~mask, 0)
        extra = _matmul_err(h, w, b, temperature)
    e = _token_bound(logp64, extra).masked_fill(~mask, 0)
    assert ((logp.double() - logp64).abs() <= e).all(), ((logp.double() - logp64).abs() - e).max().item()
    if backend == "torch" and h.dtype != torch.float32:
        opts = {k: x for k, x in kw.items() if k != "temperature"}
        loss64, stats64 = ref.policy_head_loss(logp64, ent64, old.double(), adv.double(), mask, _up(ref_logprobs),
                                               **opts)
    bound = _loss_bound(logp64, ent64, old, adv, mask, ref_logprobs, e, kw)
    assert abs(loss.item() - loss64.item()) <= bound, (loss.item(), loss64.item(), bound)
    # the policy statistics: ppo_policy_loss's on the returned logp, on the same backend
    ppo_opts = {k: kw[k] for k in PPO_KEYS if k in kw}
    _, ppo_stats = rk.ppo_policy_loss(logp, old, adv, mask, backend=backend, **ppo_opts)
    assert tuple(stats) == _layout.LINEAR_POLICY_STATS + ("logprobs",)
    assert stats.packed.shape == (len(_layout.LINEAR_POLICY_STATS),)
    for k in _layout.POLICY_STATS:
        torch.testing.assert_close(stats[k], ppo_stats[k], rtol=1e-6, atol=1e-7, msg=lambda m: "%s: %s" % (k, m))
    count = max(valid.sum().item(), 1)
    e_mean = (e.sum() / count).item()
    torch.testing.assert_close(stats["entropy"].double().cpu(), (ent64.sum() / count).cpu(), rtol=tol.STAT_RTOL,
                               atol=tol.STAT_ATOL + e_mean)
    if ref_logprobs is None:
        assert stats["kl"].item() == 0
    else:
        kl64 = ref_lp.kl_penalty(logp64, ref_logprobs.double(), kw.get("kl_kind", "k3")).masked_fill(~mask, 0)
        d_kl = (ref_lp.kl_penalty(logp64 + e, ref_logprobs.double(), kw.get("kl_kind", "k3")) - kl64).abs()
        torch.testing.assert_close(stats["kl"].double().cpu(), (kl64.sum() / count).cpu(), rtol=tol.STAT_RTOL,
                                   atol=tol.STAT_ATOL + 2 * (d_kl.masked_fill(~mask, 0).sum() / count).item())
    own = _own_grads(h, w, b, y, old, adv, mask, ref_logprobs, **kw)
    for name, g, g64, g_low, x, reach in zip(("hidden", "weight", "bias"), grads, grads64, own, (h, w, b),
                                             _grad_reach(h, w, dz64, logp, logp_exact, mask,
                                                         kw.get("ratio_level") == "sequence"
                                                         or kw.get("is_level") in ("sequence", "geometric"))):
        if x is None:
            assert g is None
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, name
        bound = (tol.GRAD_TORCH_ERR_FACTOR * (g_low.double() - g64).abs().max().item() + reach
                 + tol.GRAD_ULPS * torch.finfo(x.dtype).eps * g64.abs().max().item() + 1e-12)
        err = (g.double() - g64).abs()
        assert (err <= bound).all(), (name, err.max().item(), (err - bound).max().item())
    return loss, stats, grads


def _grad_reach(h, w, dz64, logp, logp_exact, mask, row_coupled=False):
    """Elementwise, how far d_hidden, d_weight and d_bias may move when every dlogit of token t is
    off by r_t of its size, r_t = GRAD_ULPS ulps of the gradient's dtype plus twice the token's
    measured logp error (which moves its ratio, KL slope and so its whole row of dlogits by that
    fraction), summed through the products without cancellation. row_coupled (the sequence-level
    ratio, which every token of a row shares): the row's largest logp error for each of its tokens."""
    N, V = logp.numel(), dz64.shape[-1]
    err = (logp.double() - logp_exact).abs().masked_fill(~mask, 0)
    ulps = tol.GRAD_ULPS
    if row_coupled:  # and the row's factor, itself rounded to float32 a few times (exp of a mean, row_scale)
        err = err.amax(-1, keepdim=True).expand_as(err)
        ulps += tol.GRAD_ULPS * torch.finfo(torch.float32).eps / torch.finfo(h.dtype).eps
    r = ulps * torch.finfo(h.dtype).eps + 2 * err
    az = dz64.abs().reshape(N, V) * r.reshape(N, 1)
    return (az @ w.double().abs()).reshape(h.shape), az.T @ h.double().abs().reshape(N, -1), az.sum(0)


OPTS = dict(ref_logprobs=True, kl_coef=0.05, kl_kind="k3", entropy_coef=0.01)
# the keyword arguments of linear_policy_loss that are ppo_policy_loss's
PPO_KEYS = ("clip_low", "clip_high", "dual_clip", "loss_agg", "num_tokens", "ratio_level", "objective",
            "rollout_logprobs", "is_correction", "is_level", "is_cap")


def _case(gen, device, dtype, B, T, H, V, bias=True, temperature=1.0, mask_frac=0.8):
    h, w, b = _head(gen, B, T, H, V, dtype, device, bias=bias)
    mask = _mask(gen, B, T, device, mask_frac)
    y, old, adv, rl = _batch(gen, h, w, b, mask, temperature)
    return h, w, b, y, old, adv, mask, rl


def _run_case(device, backend, c, opts, gen=None):
    """opts: linear_policy_loss's keywords, with ref_logprobs=True for the case's, num_tokens="tensor"
    for a 0-d tensor, and rollout_logprobs=True for old_logprobs plus noise (from gen)."""
    h, w, b, y, old, adv, mask, rl = c
    kw = dict(opts)
    rlp = rl if kw.pop("ref_logprobs", False) else None
    if kw.get("num_tokens") == "tensor":
        kw["num_tokens"] = torch.tensor(41.0, device=device)
    if kw.get("rollout_logprobs") is True:
        kw["rollout_logprobs"] = (old + 0.3 * torch.randn(old.shape, generator=gen).to(device)).float()
    return _check(device, backend, h, w, b, y, old, adv, mask, rlp, **kw)


# ---- values, statistics and gradients ----

@pytest.mark.parametrize("B,T,H,V", [(2, 5, 16, 1), (3, 4, 29, 131), (2, 7, 40, 300), (2, 3, 64, 1031)],
                         ids=lambda s: str(s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_float64(gen, device, backend, dtype, bias, B, T, H, V, tile):
    skip_unsupported(device, backend, dtype)
    c = _case(gen, device, dtype, B, T, H, V, bias=bias)
    loss, stats, _ = _run_case(device, backend, c, OPTS)
    h, w, b, y, old, adv, mask, rl = c
    old = _off_branch_edges(h, w, b, y, old, mask, OPTS)  # as _check moved them
    again, stats2 = rk.linear_policy_loss(h, w, y, old, adv, mask, bias=b, ref_logprobs=rl, kl_coef=0.05,
                                          entropy_coef=0.01, backend=backend)
    assert torch.equal(again, loss) and torch.equal(stats2.packed, stats.packed)  # deterministic, with or without grad
    assert torch.equal(stats2["logprobs"], stats["logprobs"])


OPTION_CASES = [
    dict(loss_agg="token-mean"),
    dict(loss_agg="seq-mean-token-mean", dual_clip=3.0),
    dict(loss_agg="seq-mean-token-sum", clip_high=0.28),
    dict(loss_agg="seq-mean-token-sum-norm", entropy_coef=0.1),
    dict(loss_agg="token-sum", ref_logprobs=True, kl_coef=0.2, kl_kind="k1"),
    dict(loss_agg="token-mean", num_tokens=50, ref_logprobs=True, kl_coef=0.1, kl_kind="k2"),
    dict(loss_agg="token-mean", num_tokens="tensor", ref_logprobs=True, kl_coef=0.1, kl_kind="abs", entropy_coef=0.02),
    dict(loss_agg="seq-mean-token-mean", ref_logprobs=True, kl_coef=0.3, kl_kind="k3", entropy_coef=0.05,
         clip_low=0.1, clip_high=0.3, dual_clip=2.0, temperature=0.7),
    dict(loss_agg="token-sum", entropy_coef=0.0, clip_low=0.0, temperature=1.5),
]


@pytest.mark.parametrize("opts", OPTION_CASES, ids=lambda o: ",".join("%s=%s" % kv for kv in o.items()))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_options(gen, device, backend, opts, tile):
    c = _case(gen, device, torch.float32, 3, 6, 24, 257, temperature=opts.get("temperature", 1.0))
    _run_case(device, backend, c, opts)


# ppo_policy_loss's options (GSPO's sequence ratio, CISPO, token-sum, the rollout correction)
POLICY_OPTION_CASES = [
    dict(ratio_level="sequence"),
    dict(ratio_level="sequence", loss_agg="seq-mean-token-mean", ref_logprobs=True, kl_coef=0.1, entropy_coef=0.05,
         clip_low=0.05, clip_high=0.1),
    dict(objective="cispo", entropy_coef=0.02),
    dict(objective="cispo", ratio_level="sequence", loss_agg="token-sum", clip_low=0.1),
    dict(loss_agg="token-sum", ref_logprobs=True, kl_coef=0.1, kl_kind="k2"),
    dict(rollout_logprobs=True, is_correction="tis", entropy_coef=0.01),
    dict(rollout_logprobs=True, is_correction="mis", is_cap=1.3, dual_clip=2.5),
    dict(rollout_logprobs=True, is_correction="tis", is_level="sequence", loss_agg="seq-mean-token-sum"),
    dict(rollout_logprobs=True, is_correction="mis", is_level="geometric", is_cap=1.1, ratio_level="sequence",
         ref_logprobs=True, kl_coef=0.05, kl_kind="abs"),
    dict(rollout_logprobs=True, is_correction="tis", is_level="token", objective="cispo", is_cap=1.2,
         loss_agg="seq-mean-token-sum-norm", entropy_coef=0.03, temperature=0.8),
]


@pytest.mark.parametrize("opts", POLICY_OPTION_CASES, ids=lambda o: ",".join("%s=%s" % kv for kv in o.items()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_policy_options(gen, device, backend, dtype, opts, tile):
    """Every option of ppo_policy_loss: values, statistics (seq_clipfrac, is_weight_mean,
    is_capped_frac among them) and gradients against the float64 reference; the call without a
    gradient (one pass, where the sequence ratio's gradient takes two) gives the same loss,
    statistics and logp."""
    skip_unsupported(device, backend, dtype)
    c = _case(gen, device, dtype, 3, 6, 24, 257, temperature=opts.get("temperature", 1.0))
    _run_case(device, backend, c, opts, gen)
    h, w, b, y, old, adv, mask, rl = c
    kw = {k: x for k, x in opts.items() if k not in ("ref_logprobs", "rollout_logprobs")}
    if opts.get("ref_logprobs"):
        kw["ref_logprobs"] = rl
    if opts.get("rollout_logprobs"):
        kw["rollout_logprobs"] = (old + 0.3 * torch.randn(old.shape, generator=gen).to(device)).float()
    old = _off_branch_edges(h, w, b, y, old, mask, kw)
    loss1, stats1 = rk.linear_policy_loss(h, w, y, old, adv, mask, bias=b, backend=backend, **kw)
    # (a different rollout draw than _run_case's: compare that with a fresh gradient call)
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    loss2, stats2 = rk.linear_policy_loss(*leaves[:2], y, old, adv, mask, bias=leaves[2], backend=backend, **kw)
    assert torch.equal(loss1, loss2.detach()) and torch.equal(stats1.packed, stats2.packed)
    assert torch.equal(stats1["logprobs"], stats2["logprobs"])


UNFUSED_OPTIONS = [
    dict(dual_clip=3.0),
    dict(ratio_level="sequence", rollout_logprobs=True, is_correction="tis"),
    dict(objective="cispo", rollout_logprobs=True, is_correction="mis", is_level="sequence", is_cap=3.0),
]


@pytest.mark.parametrize("popts", UNFUSED_OPTIONS, ids=lambda o: ",".join("%s=%s" % kv for kv in o.items()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_equals_the_unfused_ops(gen, device, backend, dtype, popts, tile):
    """The same step through linear_token_logprobs, kl_penalty, ppo_policy_loss and the entropy term
    (each on this backend): the same loss, statistics and gradients."""
    skip_unsupported(device, backend, dtype)
    h, w, b, y, old, adv, mask, rl = _case(gen, device, dtype, 3, 5, 32, 333)
    kw = dict(popts, clip_low=0.2, clip_high=0.25, loss_agg="seq-mean-token-mean")
    if kw.get("rollout_logprobs"):
        kw["rollout_logprobs"] = old + 0.3 * torch.randn(old.shape, generator=gen).to(device)
    fused = _ours(backend, h, w, b, y, old, adv, mask, rl, kl_coef=0.1, kl_kind="k2", entropy_coef=0.02,
                  temperature=0.9, **kw)

    def unfused(hh, ww, bb):
        yy = torch.where(mask, y, -100)
        logp, ent = rk.linear_token_logprobs(hh, ww, yy, bias=bb, temperature=0.9, return_entropy=True,
                                             backend=backend)
        loss, stats = rk.ppo_policy_loss(logp, old, adv, mask, backend=backend, **kw)
        kl = rk.kl_penalty(logp, rl, "k2", backend=backend)
        agg = lambda x: ref.aggregate(x.double(), mask, kw["loss_agg"])  # noqa: E731
        return (loss.double() - 0.02 * agg(ent) + 0.1 * agg(kl)).float(), stats, logp

    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    loss_u, stats_u, logp_u = unfused(*leaves)
    loss_u.backward()
    assert abs(fused[0].item() - loss_u.item()) <= 1e-5 * (1 + abs(loss_u.item()))
    torch.testing.assert_close(fused[1]["logprobs"], logp_u.detach().masked_fill(~mask, 0), rtol=0, atol=2e-5)
    for k in _layout.POLICY_STATS:
        torch.testing.assert_close(fused[1][k], stats_u[k], rtol=1e-4, atol=1e-5)
    for g, gu in zip(fused[2], (t.grad for t in leaves)):
        scale = gu.abs().max().item()
        assert (g.double() - gu.double()).abs().max().item() <= 1e-4 * scale + 8 * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_no_grad_path(gen, device, backend, tile):
    """Without a gradient (grad mode off, or no input requiring one) the loss and statistics are
    those of the gradient path, and nothing records a backward."""
    h, w, b, y, old, adv, mask, rl = _case(gen, device, torch.float32, 2, 6, 16, 150)
    kw = dict(bias=b, ref_logprobs=rl, kl_coef=0.1, entropy_coef=0.01, backend=backend)
    loss_g, stats_g, _ = _ours(backend, h, w, b, y, old, adv, mask, rl, kl_coef=0.1, entropy_coef=0.01)
    loss_n, stats_n = rk.linear_policy_loss(h, w, y, old, adv, mask, **kw)
    assert loss_n.grad_fn is None and not loss_n.requires_grad
    hh = h.clone().requires_grad_(True)
    with torch.no_grad():
        loss_o, stats_o = rk.linear_policy_loss(hh, w, y, old, adv, mask, **kw)
    assert loss_o.grad_fn is None
    for loss, stats in ((loss_n, stats_n), (loss_o, stats_o)):
        torch.testing.assert_close(loss, loss_g, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(stats.packed, stats_g.packed, rtol=1e-6, atol=1e-7)
        assert torch.equal(stats["logprobs"], stats_g["logprobs"])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_partial_gradients(gen, device, backend, tile):
    """Only the inputs that require a gradient get one (the others' products are skipped)."""
    h, w, b, y, old, adv, mask, rl = _case(gen, device, torch.float32, 2, 5, 20, 200)
    full = _exact(h, w, b, y, old, adv, mask, entropy_coef=0.05)[3]
    for which in range(3):
        leaves = [t.clone().requires_grad_(i == which) for i, t in enumerate((h, w, b))]
        loss, _ = rk.linear_policy_loss(leaves[0], leaves[1], y, old, adv, mask, bias=leaves[2], entropy_coef=0.05,
                                        backend=backend)
        loss.backward()
        for i, t in enumerate(leaves):
            if i != which:
                assert t.grad is None
        g = leaves[which].grad
        torch.testing.assert_close(g.double(), full[which], rtol=1e-4, atol=1e-6 * full[which].abs().max().item())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_scales_by_the_upstream_gradient(gen, device, backend):
    h, w, b, y, old, adv, mask, rl = _case(gen, device, torch.float32, 2, 4, 16, 100)
    _, _, g1 = _ours(backend, h, w, b, y, old, adv, mask, entropy_coef=0.05)
    _, _, g3 = _ours(backend, h, w, b, y, old, adv, mask, entropy_coef=0.05, upstream=-2.5)
    for a, c in zip(g1, g3):  # the kernels multiply their stored gradients: exactly -2.5 times
        if backend == "torch":
            torch.testing.assert_close(c, -2.5 * a, rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(c, -2.5 * a)
    if backend == "torch":
        return  # eager autograd: the backward recomputes, and may run twice
    # the kernels' gradients are handed over once: a second backward through the same call raises
    hh = h.clone().requires_grad_(True)
    loss, _ = rk.linear_policy_loss(hh, w, y, old, adv, mask, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


# ---- odd shapes and edge cases ----

@pytest.mark.parametrize("B,T,H,V", [(1, 1, 7, 1), (3, 1, 9, 13), (2, 9, 33, 97), (4, 3, 5, 211)],
                         ids=lambda s: str(s))
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_odd_shapes(gen, device, backend, B, T, H, V, tile):
    c = _case(gen, device, torch.float32, B, T, H, V, mask_frac=0.9)
    _run_case(device, backend, c, dict(OPTS, loss_agg="seq-mean-token-mean"))


@pytest.mark.parametrize("loss_agg", _layout.LOSS_AGGS)
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_masked(gen, device, backend, loss_agg):
    """No valid token: loss 0, zero gradients, statistics 0, logprobs 0; no label is read."""
    h, w, b, y, old, adv, mask, rl = _case(gen, device, torch.float32, 2, 3, 8, 20)
    mask = torch.zeros_like(mask)
    y = torch.full_like(y, 10 ** 6)
    loss, stats, grads = _ours(backend, h, w, b, y, old, adv, mask, rl, kl_coef=0.1, entropy_coef=0.1,
                               loss_agg=loss_agg)
    assert loss.item() == 0 and (stats.packed == 0).all() and (stats["logprobs"] == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty(device, backend):
    h = torch.randn(0, 3, 8, device=device).requires_grad_(True)
    w = torch.randn(10, 8, device=device).requires_grad_(True)
    z = torch.zeros(0, 3, device=device)
    loss, stats = rk.linear_policy_loss(h, w, z.long(), z, z, z.bool(), backend=backend)
    assert loss.item() == 0 and stats["logprobs"].shape == (0, 3)
    loss.backward()
    assert h.grad.shape == h.shape and (w.grad == 0).all()


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton", "torch") if b in rk.available_backends("cpu")])
def test_no_logits_sized_allocation(gen, backend, monkeypatch):
    """With the logits buffer bounded to 16 rows of V, no allocation of the forward and backward
    (every ATen allocation, recorded by the profiler) is larger than the largest of that buffer,
    d_weight ([V, H]) and d_hidden ([N, H]): the [N, V] logits (N = 240 rows here) never exist."""
    from torch.profiler import ProfilerActivity, profile
    B, T, H, V = 4, 60, 16, 1500
    from rlhf_kernels.reference import linear_logprobs as ref_lin
    monkeypatch.setattr(lp_ops, "_TILE", 16 * V)
    monkeypatch.setattr(ref_lin, "CHUNK_ELEMS", 16 * V)  # the torch backend's chunks
    h, w, b, y, old, adv, mask, rl = _case(gen, "cpu", torch.float32, B, T, H, V)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = rk.linear_policy_loss(hh, ww, y, old, adv, mask, ref_logprobs=rl, kl_coef=0.1, entropy_coef=0.01,
                                        backend=backend)
        loss.backward()
    # every tensor is made by one of these (zeros, full, copies... call them): one allocation each
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name in ("aten::empty", "aten::empty_strided"))
    bound = 4 * max(16 * V, V * H, B * T * H)
    assert largest <= bound < 4 * B * T * V // 4, (largest, bound)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_labels_at_masked_positions_are_never_read(gen, device, backend, tile):
    h, w, b, y, old, adv, mask, rl = _case(gen, device, torch.float32, 3, 6, 16, 120)
    clean = torch.where(mask, y, 0)
    for junk in (-100, 120, -(1 << 40), 1 << 40):
        dirty = torch.where(mask, y, torch.full_like(y, junk))
        a = _ours(backend, h, w, b, clean, old, adv, mask, rl, kl_coef=0.1, entropy_coef=0.1)
        d = _ours(backend, h, w, b, dirty, old, adv, mask, rl, kl_coef=0.1, entropy_coef=0.1)
        assert torch.equal(a[0], d[0]) and torch.equal(a[1].packed, d[1].packed)
        assert all(torch.equal(ga, gd) for ga, gd in zip(a[2], d[2]))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_int32_labels_integer_mask_noncontiguous(gen, device, backend, tile):
    H, V = 24, 257
    big = torch.randn(3, 4, 2 * H, generator=gen).to(device)
    h = big[..., ::2]  # a non-contiguous [3, 4, H]
    _, w, b = _head(gen, 1, 1, H, V, torch.float32, device)
    w_t = w.T.contiguous().T
    mask = _mask(gen, 3, 4, device)
    y, old, adv, rl = _batch(gen, h, w, b, mask)
    before = (big.clone(), w.clone())
    _check(device, backend, h, w_t, b, y.int(), old.T.contiguous().T, adv, mask.to(torch.uint8), rl.double(),
           kl_coef=0.1, entropy_coef=0.01, temperature=0.8)
    assert torch.equal(big, before[0]) and torch.equal(w, before[1])  # inputs are never modified


@pytest.mark.parametrize("case", ["label_near_one", "magnitude_1e4"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_adversarial(gen, device, backend, case):
    h, w, b, y, old, adv, mask, rl = _case(gen, device, torch.float32, 2, 4, 16, 300)
    b = b.clone()
    if case == "label_near_one":  # the label's logit 40 above the rest: p(label) ~ 1
        b[torch.where(mask, y, 0)] += 40.0
    else:  # logits near 1e4
        w = w * 3000.0
    old = _exact(h, w, b, y, old, adv, mask)[2].float() + 0.1
    _check(device, backend, h, w, b, y, old, adv, mask, entropy_coef=0.01)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_stays_in_its_row(gen, device, backend, tile):
    """A NaN in one valid token's hidden state: its logp and d_hidden row are NaN (as PyTorch's), the
    loss too; every other token's logp and d_hidden stay finite."""
    h, w, b, y, old, adv, mask, rl = _case(gen, device, torch.float32, 2, 5, 16, 200, mask_frac=1.0)
    mask[0, 1] = True
    h = h.clone()
    h[0, 1, 3] = float("nan")
    loss, stats, grads = _ours(backend, h, w, b, y, old, adv, mask, rl, kl_coef=0.1, entropy_coef=0.1)
    logp, dh = stats["logprobs"], grads[0]
    assert torch.isnan(loss) and torch.isnan(logp[0, 1]) and torch.isnan(dh[0, 1]).all()
    others = torch.ones_like(mask)
    others[0, 1] = False
    assert torch.isfinite(logp[others]).all() and torch.isfinite(dh[others]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_unvalidated_bad_label(gen, device, backend, tile):
    """validate=False: a label outside [0, V) at a valid position gives NaN logp and entropy (so the
    entropy statistic) and no gradient to its row, never an error or a read outside the vocabulary;
    validate=True raises. (The loss is NaN but on triton, whose PPO kernel's max drops a NaN ratio.)"""
    h, w, b, y, old, adv, mask, rl = _case(gen, device, torch.float32, 2, 4, 16, 100, mask_frac=1.0)
    mask[0, 2] = True
    y = y.clone()
    y[0, 2] = 100
    loss, stats, grads = _ours(backend, h, w, b, y, old, adv, mask, validate=False)
    assert torch.isnan(stats["logprobs"][0, 2]) and torch.isnan(stats["entropy"])
    assert torch.isnan(loss) or backend == "triton"
    assert (grads[0][0, 2] == 0).all()
    with pytest.raises(ValueError, match=r"labels\[0, 2\] = 100"):
        rk.linear_policy_loss(h, w, y, old, adv, mask, backend=backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_input(device, backend):
    B, T, H, V = 2, 3, 8, 10
    h, w = torch.randn(B, T, H, device=device), torch.randn(V, H, device=device)
    y = torch.randint(0, V, (B, T), device=device)
    x = torch.randn(B, T, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    lin = lambda **kw: rk.linear_policy_loss(**dict(dict(hidden=h, weight=w, labels=y, old_logprobs=x,  # noqa: E731
                                                         advantages=x, mask=mask, backend=backend), **kw))
    cases = [
        (ValueError, r"hidden.*\[B, T, H\]", dict(hidden=h[0])),
        (ValueError, r"weight.*H = 8", dict(weight=torch.randn(V, 7, device=device))),
        (ValueError, "V = 0", dict(weight=torch.randn(0, H, device=device))),
        (TypeError, "weight.*dtype", dict(weight=w.double())),
        (TypeError, "bias.*dtype", dict(bias=torch.randn(V, dtype=torch.float64, device=device))),
        (ValueError, r"bias.*\[10\]", dict(bias=torch.randn(9, device=device))),
        (ValueError, r"labels.*\[2, 3\]", dict(labels=y[:, :2])),
        (TypeError, "labels", dict(labels=y.float())),
        (ValueError, r"labels\[0, 2\] = 10", dict(labels=torch.where(torch.arange(T, device=device) == 2, V, y))),
        (ValueError, r"labels\[0, 0\] = -1", dict(labels=torch.full_like(y, -1))),
        (ValueError, "old_logprobs", dict(old_logprobs=x[:, :2])),
        (TypeError, "old_logprobs", dict(old_logprobs=y)),
        (ValueError, "advantages", dict(advantages=x[None])),
        (TypeError, "mask", dict(mask=mask.float())),
        (ValueError, "mask", dict(mask=mask[:1])),
        (ValueError, "ref_logprobs", dict(ref_logprobs=x[:1], kl_coef=0.1)),
        (ValueError, "ref_logprobs", dict(kl_coef=0.1)),
        (ValueError, "ref_logprobs", dict(ref_logprobs=x)),
        (ValueError, "kl_kind", dict(ref_logprobs=x, kl_coef=0.1, kl_kind="k4")),
        (TypeError, "kl_kind", dict(ref_logprobs=x, kl_coef=0.1, kl_kind=3)),
        (ValueError, "kl_coef", dict(ref_logprobs=x, kl_coef=-0.1)),
        (ValueError, "entropy_coef", dict(entropy_coef=-1.0)),
        (ValueError, "entropy_coef", dict(entropy_coef=float("inf"))),
        (ValueError, "clip_low", dict(clip_low=-0.1)),
        (ValueError, "dual_clip", dict(dual_clip=1.0)),
        (ValueError, "loss_agg", dict(loss_agg="seq-mean")),
        (ValueError, "num_tokens", dict(num_tokens=0)),
        (ValueError, "temperature", dict(temperature=0.0)),
        (TypeError, "hidden", dict(hidden=h.tolist())),
        (ValueError, "ratio_level", dict(ratio_level="seq")),
        (ValueError, "objective", dict(objective="grpo")),
        (ValueError, "is_correction", dict(rollout_logprobs=x, is_correction="is")),
        (ValueError, "is_correction", dict(is_correction="tis")),
        (ValueError, "rollout_logprobs", dict(rollout_logprobs=x)),
        (ValueError, "rollout_logprobs", dict(rollout_logprobs=x[:1], is_correction="tis")),
        (TypeError, "rollout_logprobs", dict(rollout_logprobs=y, is_correction="tis")),
        (ValueError, "is_level", dict(is_level="sequence")),
        (ValueError, "is_cap", dict(rollout_logprobs=x, is_correction="tis", is_cap=1.0)),
        (ValueError, "dual_clip", dict(objective="cispo", dual_clip=3.0)),
    ]
    for kind, words, kw in cases:
        with pytest.raises(kind, match=words) as info:
            lin(**kw)
        assert not isinstance(info.value, rk.BackendUnavailable), kw


def test_explicit_backend_rejects_float64():
    h, w = torch.randn(1, 3, 4, dtype=F64), torch.randn(6, 4, dtype=F64)
    y, x, m = torch.randint(0, 6, (1, 3)), torch.randn(1, 3), torch.ones(1, 3, dtype=torch.bool)
    if "cpu" in rk.available_backends("cpu"):
        with pytest.raises(rk.BackendUnavailable, match="float64"):
            rk.linear_policy_loss(h, w, y, x, x, m, backend="cpu")
    loss, _ = rk.linear_policy_loss(h, w, y, x, x, m)  # auto falls back to the torch backend
    assert loss.dtype == torch.float32


def test_reference_chunking_matches_unchunked(gen, monkeypatch):
    """The torch backend (chunked token_logprobs with checkpointing, float64 loss terms) equals the
    whole-logits reference."""
    from rlhf_kernels.reference import linear_logprobs as ref_lin
    monkeypatch.setattr(ref_lin, "CHUNK_ELEMS", 500)
    h, w, b, y, old, adv, mask, rl = _case(gen, "cpu", F64, 3, 7, 16, 100)
    kw = dict(bias=b, ref_logprobs=rl.double(), kl_coef=0.1, entropy_coef=0.1, loss_agg="seq-mean-token-sum")
    a = ref.linear_policy_loss(h, w, y, old.double(), adv.double(), mask, **kw)
    c = ref.chunked_linear_policy_loss(h, w, y, old.double(), adv.double(), mask, **kw)
    torch.testing.assert_close(c[0], a[0])
    torch.testing.assert_close(c[2], a[2].float())  # its logits are float32, as the backend's


def test_stats_mapping(gen):
    h, w, b, y, old, adv, mask, rl = _case(gen, "cpu", torch.float32, 2, 4, 8, 30)
    loss, stats = rk.linear_policy_loss(h, w, y, old, adv, mask, ref_logprobs=rl, kl_coef=0.1)
    assert list(stats) == list(_layout.LINEAR_POLICY_STATS) + ["logprobs"] and len(stats) == len(list(stats))
    assert "logprobs" in stats and "entropy" in stats and "kl" in stats and "nope" not in stats
    d = dict(stats)
    assert d["logprobs"] is stats["logprobs"] and d.keys() == set(stats)
    for i, k in enumerate(_layout.LINEAR_POLICY_STATS):
        assert stats[k].dim() == 0 and stats[k].item() == stats.packed[i].item()
    assert "logprobs=tensor(shape=[2, 4])" in repr(stats)


# ---- torch.library registration: opcheck and torch.compile ----

NATIVE_DEVICES = native_devices()


@needs_native
@pytest.mark.parametrize("device", NATIVE_DEVICES)
def test_opcheck(gen, device):
    ops = torch.ops.rlhf_kernels
    for dtype, ldtype, tile, agg in ((torch.float32, torch.int64, 0, 0), (torch.bfloat16, torch.int32, 300, 1)):
        h, w, b, y, old, adv, mask, rl = _case(gen, device, dtype, 2, 3, 16, 150)
        y = y.to(ldtype)
        nt = torch.tensor(5.0, device=device)
        hg, wg, bg = (t.clone().requires_grad_(True) for t in (h, w, b))
        args = (y, old, adv, mask, rl, nt, None, 0.8, 0.1, "k3", 0.01, 0.2, None, 3.0, agg, None, 0, None, tile, True)
        torch.library.opcheck(ops.linear_policy_fwd, (hg, wg, bg) + args)
        torch.library.opcheck(ops.linear_policy_fwd, (h, w, None, y, old, adv, mask, None, None, 7.0, 1.0, 0.0, "k1",
                                                      0.0, 0.2, 0.3, None, 4, None, 0, None, tile, False))
        torch.library.opcheck(ops.linear_policy_fwd_grad, (h, w, b) + args + (True, True, True))
        torch.library.opcheck(ops.linear_policy_fwd_grad, (h, w, None) + args + (False, True, False))
        # the sequence ratio (two passes) under a sequence-level mis correction, and CISPO
        roll = old + 0.3 * torch.randn(old.shape, generator=gen).to(device)
        seq = _layout.pack_options(ratio_level=1, is_correction=2, is_level=2)
        cispo = _layout.pack_options(objective=1, is_correction=1)
        for options, dual in ((seq, 3.0), (cispo, None)):
            oargs = args[:13] + (dual, agg, roll, options, 1.5, tile, True)
            torch.library.opcheck(ops.linear_policy_fwd, (hg, wg, bg) + oargs)
            torch.library.opcheck(ops.linear_policy_fwd_grad, (h, w, b) + oargs + (True, True, True))


def _compile_case(gen, backend, **options):
    h, w, b, y, old, adv, mask, rl = _case(gen, "cpu", torch.float32, 3, 4, 16, 200)
    options = dict(options or dict(dual_clip=3.0))
    if options.get("rollout_logprobs"):
        options["rollout_logprobs"] = old + 0.3 * torch.randn(old.shape, generator=gen)

    def f(h, w, b):
        loss, stats = rk.linear_policy_loss(h, w, y, old, adv, mask, bias=b, temperature=0.9, ref_logprobs=rl,
                                            kl_coef=0.1, entropy_coef=0.01, backend=backend, **options)
        return loss * 2 + stats["clipfrac"], stats["logprobs"]

    leaves_e = [t.clone().requires_grad_(True) for t in (h, w, b)]
    leaves_c = [t.clone().requires_grad_(True) for t in (h, w, b)]
    out_e, lp_e = f(*leaves_e)  # eager first (lazy imports, Triton compilation)
    out_e.backward()
    compiled = torch.compile(f, fullgraph=True)
    out_c, lp_c = compiled(*leaves_c)
    out_c.backward()
    assert torch.allclose(out_e, out_c, rtol=1e-6, atol=1e-6) and torch.equal(lp_e, lp_c)
    for a, c in zip(leaves_e, leaves_c):
        assert torch.allclose(a.grad, c.grad, rtol=1e-5, atol=1e-7)


COMPILE_OPTIONS = [{}, dict(ratio_level="sequence", rollout_logprobs=True, is_correction="mis", is_level="geometric")]


@needs_native
@pytest.mark.parametrize("options", COMPILE_OPTIONS, ids=["plain", "gspo-mis"])
def test_torch_compile_fullgraph(gen, options):
    _compile_case(gen, "cpu", **options)


@pytest.mark.skipif("triton" not in rk.available_backends("cpu"), reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("options", COMPILE_OPTIONS, ids=["plain", "gspo-mis"])
def test_torch_compile_fullgraph_triton(gen, options):
    _compile_case(gen, "triton", **options)


# ---- on a GPU (skipped here) ----

def _cuda_backends():
    return [b for b in ("cuda", "triton") if b in rk.available_backends("cuda")] if torch.cuda.is_available() else []


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_bad_device(backend):
    if backend not in _cuda_backends():
        pytest.skip("%s backend not available" % backend)
    h, w = torch.randn(2, 3, 8, device="cuda"), torch.randn(10, 8, device="cuda")
    x, m, y = torch.randn(2, 3, device="cuda"), torch.ones(2, 3, dtype=torch.bool, device="cuda"), torch.zeros(2, 3)
    for kw in (dict(labels=y.long()), dict(labels=y.long().cuda(), mask=m.cpu()), dict(labels=y.long().cuda(),
                                                                                      old_logprobs=x.cpu())):
        args = dict(hidden=h, weight=w, labels=None, old_logprobs=x, advantages=x, mask=m, backend=backend) | kw
        with pytest.raises(ValueError, match="device|is on"):
            rk.linear_policy_loss(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_peak_memory_and_no_logits(backend):
    """N * V float32 logits would be 512 MiB here; with the tile budget set to 2^22 logits (16 MiB)
    the extra memory beyond the gradients (the chunk's logits and bf16 dlogits, the 128 MiB float32
    d_weight accumulator, per-token vectors) stays under half of it, forward and backward."""
    if backend not in _cuda_backends():
        pytest.skip("%s backend not available" % backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, V = 8, 512, 1024, 32768
    h = torch.randn(B, T, H, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(V, H, generator=gen, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=gen, device="cuda")
    x = torch.randn(B, T, generator=gen, device="cuda") - 10
    m = torch.rand(B, T, generator=gen, device="cuda") < 0.9
    old = lp_ops._TILE
    lp_ops._TILE = 1 << 22
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, _ = rk.linear_policy_loss(h, w, y, x, x.abs(), m, entropy_coef=0.01, backend=backend)
        loss.backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - (h.numel() + w.numel()) * 2
    finally:
        lp_ops._TILE = old
    assert extra < 256 << 20, extra / 2 ** 20


@pytest.mark.cuda
def test_cuda_large_vocab_weight_accumulates_in_bf16():
    """Above the float32 accumulator's bound (V * H * 4 > 512 MiB) d_weight accumulates in bf16, one
    rounding per chunk: still within a few bf16 ulps of the float64 gradient at 8 chunks."""
    if "cuda" not in _cuda_backends():
        pytest.skip("cuda backend not available")
    gen = torch.Generator(device="cuda").manual_seed(1)
    B, T, H, V = 4, 64, 1024, 151936
    h = torch.randn(B, T, H, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(V, H, generator=gen, device="cuda", dtype=torch.bfloat16) / 32
    y = torch.randint(0, V, (B, T), generator=gen, device="cuda")
    m = torch.ones(B, T, dtype=torch.bool, device="cuda")
    old, adv = torch.full((B, T), -12.0, device="cuda"), torch.randn(B, T, generator=gen, device="cuda")
    prev = lp_ops._TILE
    lp_ops._TILE = 32 * V  # 8 chunks of 32 rows
    try:
        wg = w.clone().requires_grad_(True)
        rk.linear_policy_loss(h, wg, y, old, adv, m, entropy_coef=0.01, backend="cuda")[0].backward()
    finally:
        lp_ops._TILE = prev
    g64 = _exact(h, w, None, y, old, adv, m, entropy_coef=0.01)[3][1]
    own = _own_grads(h, w, None, y, old, adv, m, entropy_coef=0.01)[1]
    err = (wg.grad.double() - g64).abs().max().item()
    bound = (tol.GRAD_TORCH_ERR_FACTOR * (own.double() - g64).abs().max().item()
             + tol.GRAD_ULPS * torch.finfo(torch.bfloat16).eps * g64.abs().max().item())
    assert err <= bound, (err, bound)


@pytest.mark.cuda
def test_cuda_graph_capture():
    """Forward and backward capture into a CUDA graph (validate is skipped while capturing)."""
    if "cuda" not in _cuda_backends():
        pytest.skip("cuda backend not available")
    gen = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(2, 16, 64, generator=gen, device="cuda").requires_grad_(True)
    w = torch.randn(1000, 64, generator=gen, device="cuda").requires_grad_(True)
    y = torch.randint(0, 1000, (2, 16), generator=gen, device="cuda")
    x = torch.randn(2, 16, generator=gen, device="cuda") - 7
    m = torch.ones(2, 16, dtype=torch.bool, device="cuda")
    step = lambda: rk.linear_policy_loss(h, w, y, x, x.abs(), m, entropy_coef=0.01, backend="cuda")[0].backward()  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    h.grad = w.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    torch.cuda.synchronize()
    ref_h = h.grad.clone()
    h.grad.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(h.grad, ref_h)
