"""PPO clipped policy loss and clipped value loss, with every statistic on the device.

Per token, over [B, T] inputs:
    ratio = exp(logp - old_logp)
    policy  l = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
            with dual_clip=c (> 1), tokens with A < 0 take min(l, -A * c)
    value   l = 0.5 * max((V - R)^2, (clamp(V, V_old - clip, V_old + clip) - R)^2)
Aggregation (``loss_agg``) over valid tokens (mask true):
    "token-mean"               sum(l) / (num_tokens if given, else the number of valid tokens)
    "seq-mean-token-mean"      mean over rows of (row sum of l / row's valid count)
    "seq-mean-token-sum"       mean over rows of the row sum of l
    "seq-mean-token-sum-norm"  sum(l) / (B * T)   (Dr. GRPO)
The per-row means skip rows with no valid token; a batch with no valid token gives loss 0
and zero gradient. ``num_tokens`` (a number or a 0-d tensor) is the *global* number of
valid tokens across micro-batches, so that summing the micro-batch losses equals the
full-batch loss. Nothing here syncs with the device: a tensor ``num_tokens`` is read by
the kernels and the statistics stay on the device.

On the native backends the whole call is one dispatcher call: the C++ op checks and
converts its arguments (csrc/include/rlhf/ppo_op.h) and its autograd is wired in C++
(csrc/autograd/ppo.cpp), so neither the forward nor the backward re-enters Python.
"""

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._layout import LOSS_AGG_CODES, LOSS_AGGS, POLICY_STATS, VALUE_STATS
from rlhf_kernels._stats import stats as _stats
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import ppo as ref

NATIVE = _backend.NATIVE
if _ext.loaded():
    _policy_fwd = torch.ops.rlhf_kernels.ppo_policy_fwd.default
    _value_fwd = torch.ops.rlhf_kernels.ppo_value_fwd.default


def _loss_agg_code(op, loss_agg):
    code = LOSS_AGG_CODES.get(loss_agg) if isinstance(loss_agg, str) else None
    if code is None:
        raise ValueError("%s: `loss_agg` must be one of %s, got %r" % (op, ", ".join(LOSS_AGGS), loss_agg))
    return code


def _num_tokens(op, num_tokens):
    """(tensor, number): the native ops' two ways of taking ``num_tokens`` (at most one set)."""
    if num_tokens is None or isinstance(num_tokens, torch.Tensor):
        return num_tokens, None
    return None, v.number(op, "num_tokens", num_tokens, lo=0.0, lo_open=True)


def _check_num_tokens(op, num_tokens, device):
    """The Python backends' check of ``num_tokens``: None, or a 0-d float64 tensor on ``device``."""
    nt, value = _num_tokens(op, num_tokens)
    if value is not None:
        return torch.full((), value, dtype=torch.float64, device=device)
    if nt is None:
        return None
    if nt.numel() != 1 or nt.dim() > 1:
        raise ValueError("%s: `num_tokens` must be a number or a 0-d tensor, got shape %s" % (op, list(nt.shape)))
    if nt.is_complex() or nt.dtype == torch.bool:
        raise TypeError("%s: `num_tokens` must be a real number tensor, got %s" % (op, nt.dtype))
    if nt.device != device:
        raise ValueError("%s: `num_tokens` is on %s but the inputs are on %s" % (op, nt.device, device))
    return nt.detach().reshape(()).to(torch.float64)


def _check_inputs(op, names, tensors, mask):
    """The Python backends' checks of the [B, T] inputs (the native ops make the same in C++)."""
    for name, t in zip(names, tensors):
        v.tensor(op, name, t, kind="float")
    v.tensor(op, names[0], tensors[0], ndim=2)
    v.tensor(op, "mask", mask, kind="mask")
    for name, t in zip(names[1:], tensors[1:]):
        v.same_shape(op, names[0], tensors[0], name, t)
    v.same_shape(op, names[0], tensors[0], "mask", mask)
    v.same_device(op, names[0], tensors[0], mask=mask, **dict(zip(names[1:], tensors[1:])))


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    loss_agg="token-mean", num_tokens=None, backend="auto"):
    """Clipped PPO policy loss with asymmetric and dual clipping.

    Args:
        logprobs: [B, T] float (fp32/bf16/fp16), log pi(y_t) of the current policy; the
            only input that receives a gradient.
        old_logprobs: [B, T] float, log pi_old(y_t) (treated as constant).
        advantages: [B, T] float (treated as constant).
        mask: [B, T] bool or integer (nonzero = the token counts). Float masks are refused.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high]; clip_high=None
            means clip_low.
        dual_clip: None, or c > 1: tokens with A < 0 have their loss capped at -A * c.
        loss_agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm" (see the module docstring).
        num_tokens: None, a number > 0, or a 0-d tensor on the inputs' device: the global
            normalizer of "token-mean" (ignored by the other modes).
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (loss, stats): loss a 0-d float32 tensor; stats a read-only mapping of 0-d float32
        tensors over the valid tokens (0 when there is none): clipfrac, clipfrac_low,
        clipfrac_high, dual_clipfrac, approx_kl (mean of (ratio - 1) - log ratio),
        ratio_mean, ratio_min, ratio_max; ``stats.packed`` holds all of them in one tensor.
    """
    op = "ppo_policy_loss"
    name = _backend.pick(backend, logprobs, op, "logprobs")
    agg = _loss_agg_code(op, loss_agg)
    if name in NATIVE:
        nt, nt_value = _num_tokens(op, num_tokens)
        try:
            loss, packed, _ = _policy_fwd(logprobs, old_logprobs, advantages, mask, nt, nt_value, clip_low,
                                          clip_high, dual_clip, agg)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return loss, _stats(POLICY_STATS, packed)
    _check_inputs(op, ("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), mask)
    clip_low = v.number(op, "clip_low", clip_low, lo=0.0)
    clip_high = clip_low if clip_high is None else v.number(op, "clip_high", clip_high, lo=0.0)
    dual_clip = v.number(op, "dual_clip", dual_clip, lo=1.0, lo_open=True, allow_none=True)
    nt = _check_num_tokens(op, num_tokens, logprobs.device)
    lp, olp, adv, m = v.as_f32(logprobs), v.as_f32(old_logprobs), v.as_f32(advantages), v.as_mask(mask)
    if name == "torch":
        loss, stats = ref.ppo_policy_loss(lp.double(), olp.detach().double(), adv.detach().double(), m,
                                          clip_low, clip_high, dual_clip, loss_agg, nt)
        return loss.float(), _stats(POLICY_STATS, torch.stack([stats[k] for k in POLICY_STATS]).float())
    from rlhf_kernels.triton import ppo as tri
    loss, packed, _ = tri.policy_forward(lp, olp.detach(), adv.detach(), m, nt, clip_low, clip_high, dual_clip, agg)
    return loss, _stats(POLICY_STATS, packed)


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, loss_agg="token-mean", num_tokens=None,
                   backend="auto"):
    """Clipped value loss.

    Args:
        values: [B, T] float, V_t of the current critic; the only input that receives a gradient.
        old_values: [B, T] float, V_t at rollout time (constant).
        returns: [B, T] float, the targets R_t (constant).
        mask: [B, T] bool or integer (nonzero = the token counts).
        clip: c > 0, or None for the unclipped 0.5 * (V - R)^2.
        loss_agg, num_tokens, backend: as in ``ppo_policy_loss``.

    Returns:
        (loss, stats): loss 0-d float32; stats ``vf_clipfrac`` (fraction of valid tokens where
        the clipped term is strictly larger) and ``explained_var`` = 1 - Var(R - V) / Var(R)
        over valid tokens (0 when Var(R) = 0), as in ``ppo_policy_loss``.
    """
    op = "ppo_value_loss"
    name = _backend.pick(backend, values, op, "values")
    agg = _loss_agg_code(op, loss_agg)
    if name in NATIVE:
        nt, nt_value = _num_tokens(op, num_tokens)
        try:
            loss, packed, _ = _value_fwd(values, old_values, returns, mask, nt, nt_value, clip, agg)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return loss, _stats(VALUE_STATS, packed)
    _check_inputs(op, ("values", "old_values", "returns"), (values, old_values, returns), mask)
    clip = v.number(op, "clip", clip, lo=0.0, lo_open=True, allow_none=True)
    nt = _check_num_tokens(op, num_tokens, values.device)
    val, ov, ret, m = v.as_f32(values), v.as_f32(old_values), v.as_f32(returns), v.as_mask(mask)
    if name == "torch":
        loss, stats = ref.ppo_value_loss(val.double(), ov.detach().double(), ret.detach().double(), m, clip,
                                         loss_agg, nt)
        return loss.float(), _stats(VALUE_STATS, torch.stack([stats[k] for k in VALUE_STATS]).float())
    from rlhf_kernels.triton import ppo as tri
    loss, packed, _ = tri.value_forward(val, ov.detach(), ret.detach(), m, nt, clip, agg)
    return loss, _stats(VALUE_STATS, packed)


if _ext.loaded():
    @torch.library.register_fake("rlhf_kernels::ppo_policy_fwd")
    def _policy_fwd_fake(logprobs, old_logprobs, advantages, mask, num_tokens, num_tokens_value, clip_low, clip_high,
                         dual_clip, loss_agg):
        f32 = dict(dtype=torch.float32)
        return (logprobs.new_empty((), **f32), logprobs.new_empty((len(POLICY_STATS),), **f32),
                logprobs.new_empty((logprobs.shape[0],), **f32))

    @torch.library.register_fake("rlhf_kernels::ppo_policy_bwd")
    def _policy_bwd_fake(grad, logprobs, old_logprobs, advantages, mask, row_scale, clip_low, clip_high, dual_clip):
        return logprobs.new_empty(logprobs.shape, dtype=torch.float32)

    @torch.library.register_fake("rlhf_kernels::ppo_value_fwd")
    def _value_fwd_fake(values, old_values, returns, mask, num_tokens, num_tokens_value, clip, loss_agg):
        f32 = dict(dtype=torch.float32)
        return (values.new_empty((), **f32), values.new_empty((len(VALUE_STATS),), **f32),
                values.new_empty((values.shape[0],), **f32))

    @torch.library.register_fake("rlhf_kernels::ppo_value_bwd")
    def _value_bwd_fake(grad, values, old_values, returns, mask, row_scale, clip):
        return values.new_empty(values.shape, dtype=torch.float32)
