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
the kernels and the statistics are 0-d tensors.
"""

import numbers

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import ppo as ref

LOSS_AGGS = ref.LOSS_AGGS
POLICY_STATS = ref.POLICY_STATS
VALUE_STATS = ref.VALUE_STATS


def _check_inputs(op, names, tensors, mask):
    first_name, first = names[0], tensors[0]
    v.tensor(op, first_name, first, ndim=2, kind="float")
    for name, t in zip(names[1:], tensors[1:]):
        v.tensor(op, name, t, kind="float")
        v.same_shape(op, first_name, first, name, t)
    v.tensor(op, "mask", mask, kind="mask")
    v.same_shape(op, first_name, first, "mask", mask)
    v.same_device(op, first_name, first, mask=mask, **dict(zip(names[1:], tensors[1:])))


def _loss_agg_code(op, loss_agg):
    if loss_agg not in LOSS_AGGS:
        raise ValueError("%s: `loss_agg` must be one of %s, got %r" % (op, ", ".join(LOSS_AGGS), loss_agg))
    return LOSS_AGGS.index(loss_agg)


def _num_tokens(op, num_tokens, device):
    """None, or a 0-d float64 tensor on ``device`` (made without a host sync)."""
    if num_tokens is None:
        return None
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1 or num_tokens.dim() > 1:
            raise ValueError("%s: `num_tokens` must be a number or a 0-d tensor, got shape %s"
                             % (op, tuple(num_tokens.shape)))
        if num_tokens.is_complex() or num_tokens.dtype == torch.bool:
            raise TypeError("%s: `num_tokens` must be a real number tensor, got %s" % (op, num_tokens.dtype))
        if num_tokens.device != device:
            raise ValueError("%s: `num_tokens` is on %s but the inputs are on %s" % (op, num_tokens.device, device))
        return num_tokens.detach().reshape(()).to(torch.float64)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Real):
        raise TypeError("%s: `num_tokens` must be a number or a 0-d tensor, got %s" % (op, type(num_tokens).__name__))
    if not num_tokens > 0:
        raise ValueError("%s: `num_tokens` must be > 0, got %r" % (op, num_tokens))
    return torch.full((), float(num_tokens), dtype=torch.float64, device=device)


def _check_clip(op, name, value, allow_none=False, above=0.0, strict=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError("%s: `%s` must be a number%s, got %r" % (op, name, " or None" if allow_none else "", value))
    if value < above or (strict and value == above):
        raise ValueError("%s: `%s` must be %s %g, got %r" % (op, name, ">" if strict else ">=", above, value))
    return float(value)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    loss_agg="token-mean", num_tokens=None, backend="auto"):
    """Clipped PPO policy loss with asymmetric and dual clipping.

    Args:
        logprobs: [B, T] float (fp32/bf16/fp16), log pi(y_t) of the current policy; the
            only input that receives a gradient.
        old_logprobs: [B, T] float, log pi_old(y_t) (treated as constant).
        advantages: [B, T] float (treated as constant).
        mask: [B, T] bool or 0/1; true at the tokens that count.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high]; clip_high=None
            means clip_low.
        dual_clip: None, or c > 1: tokens with A < 0 have their loss capped at -A * c.
        loss_agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm" (see the module docstring).
        num_tokens: None, a number > 0, or a 0-d tensor on the inputs' device: the global
            normalizer of "token-mean" (ignored by the other modes).
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (loss, stats): loss a 0-d float32 tensor; stats a dict of 0-d float32 tensors over
        the valid tokens (0 when there is none): clipfrac, clipfrac_low, clipfrac_high,
        dual_clipfrac, approx_kl (mean of (ratio - 1) - log ratio), ratio_mean, ratio_min,
        ratio_max.
    """
    op = "ppo_policy_loss"
    _check_inputs(op, ("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), mask)
    agg = _loss_agg_code(op, loss_agg)
    clip_low = _check_clip(op, "clip_low", clip_low)
    clip_high = clip_low if clip_high is None else _check_clip(op, "clip_high", clip_high)
    dual_clip = _check_clip(op, "dual_clip", dual_clip, allow_none=True, above=1.0, strict=True)
    nt = _num_tokens(op, num_tokens, logprobs.device)
    name = _backend.resolve(backend, logprobs.device, op)
    lp, olp, adv, m = v.as_f32(logprobs), v.as_f32(old_logprobs), v.as_f32(advantages), v.as_mask(mask)
    if name == "torch":
        loss, stats = ref.ppo_policy_loss(lp.double(), olp.detach().double(), adv.detach().double(), m,
                                          clip_low, clip_high, dual_clip, loss_agg, nt)
        return loss.float(), {k: s.float() for k, s in stats.items()}
    if name == "triton":
        from rlhf_kernels.triton import ppo as tri
        loss, stats = tri.PPOPolicyLoss.apply(lp, olp.detach(), adv.detach(), m, nt, clip_low, clip_high,
                                              dual_clip, agg)
    else:
        loss, stats, _ = torch.ops.rlhf_kernels.ppo_policy_fwd(lp, olp.detach(), adv.detach(), m, nt, clip_low,
                                                               clip_high, dual_clip, agg)
    return loss, dict(zip(POLICY_STATS, stats.unbind(0)))


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, loss_agg="token-mean", num_tokens=None,
                   backend="auto"):
    """Clipped value loss.

    Args:
        values: [B, T] float, V_t of the current critic; the only input that receives a gradient.
        old_values: [B, T] float, V_t at rollout time (constant).
        returns: [B, T] float, the targets R_t (constant).
        mask: [B, T] bool or 0/1.
        clip: c > 0, or None for the unclipped 0.5 * (V - R)^2.
        loss_agg, num_tokens, backend: as in ``ppo_policy_loss``.

    Returns:
        (loss, stats): loss 0-d float32; stats ``vf_clipfrac`` (fraction of valid tokens where
        the clipped term is strictly larger) and ``explained_var`` = 1 - Var(R - V) / Var(R)
        over valid tokens (0 when Var(R) = 0).
    """
    op = "ppo_value_loss"
    _check_inputs(op, ("values", "old_values", "returns"), (values, old_values, returns), mask)
    agg = _loss_agg_code(op, loss_agg)
    clip = _check_clip(op, "clip", clip, allow_none=True, strict=True)
    nt = _num_tokens(op, num_tokens, values.device)
    name = _backend.resolve(backend, values.device, op)
    val, ov, ret, m = v.as_f32(values), v.as_f32(old_values), v.as_f32(returns), v.as_mask(mask)
    if name == "torch":
        loss, stats = ref.ppo_value_loss(val.double(), ov.detach().double(), ret.detach().double(), m, clip,
                                         loss_agg, nt)
        return loss.float(), {k: s.float() for k, s in stats.items()}
    if name == "triton":
        from rlhf_kernels.triton import ppo as tri
        loss, stats = tri.PPOValueLoss.apply(val, ov.detach(), ret.detach(), m, nt, clip, agg)
    else:
        loss, stats, _ = torch.ops.rlhf_kernels.ppo_value_fwd(val, ov.detach(), ret.detach(), m, nt, clip, agg)
    return loss, dict(zip(VALUE_STATS, stats.unbind(0)))


if _ext.loaded():
    @torch.library.register_fake("rlhf_kernels::ppo_policy_fwd")
    def _policy_fwd_fake(logprobs, old_logprobs, advantages, mask, num_tokens, clip_low, clip_high, dual_clip,
                         loss_agg):
        return (logprobs.new_empty(()), logprobs.new_empty((len(POLICY_STATS),)),
                logprobs.new_empty((logprobs.shape[0],)))

    @torch.library.register_fake("rlhf_kernels::ppo_policy_bwd")
    def _policy_bwd_fake(grad, logprobs, old_logprobs, advantages, mask, row_scale, clip_low, clip_high, dual_clip):
        return torch.empty_like(logprobs)

    @torch.library.register_fake("rlhf_kernels::ppo_value_fwd")
    def _value_fwd_fake(values, old_values, returns, mask, num_tokens, clip, loss_agg):
        return values.new_empty(()), values.new_empty((len(VALUE_STATS),)), values.new_empty((values.shape[0],))

    @torch.library.register_fake("rlhf_kernels::ppo_value_bwd")
    def _value_bwd_fake(grad, values, old_values, returns, mask, row_scale, clip):
        return torch.empty_like(values)

    def _policy_setup(ctx, inputs, output):
        logprobs, old_logprobs, advantages, mask, _, clip_low, clip_high, dual_clip, _ = inputs
        ctx.save_for_backward(logprobs, old_logprobs, advantages, mask, output[2])
        ctx.clip = (clip_low, clip_high, dual_clip)

    def _policy_backward(ctx, grad_loss, grad_stats, grad_scale):
        logprobs, old_logprobs, advantages, mask, row_scale = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = logprobs.new_zeros(())
        d = torch.ops.rlhf_kernels.ppo_policy_bwd(grad_loss.contiguous(), logprobs, old_logprobs, advantages, mask,
                                                  row_scale, *ctx.clip)
        return d, None, None, None, None, None, None, None, None

    torch.library.register_autograd("rlhf_kernels::ppo_policy_fwd", _policy_backward, setup_context=_policy_setup)

    def _value_setup(ctx, inputs, output):
        values, old_values, returns, mask, _, clip, _ = inputs
        ctx.save_for_backward(values, old_values, returns, mask, output[2])
        ctx.clip = clip

    def _value_backward(ctx, grad_loss, grad_stats, grad_scale):
        values, old_values, returns, mask, row_scale = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = values.new_zeros(())
        d = torch.ops.rlhf_kernels.ppo_value_bwd(grad_loss.contiguous(), values, old_values, returns, mask,
                                                 row_scale, ctx.clip)
        return d, None, None, None, None, None, None

    torch.library.register_autograd("rlhf_kernels::ppo_value_fwd", _value_backward, setup_context=_value_setup)
