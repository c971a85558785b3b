"""PPO clipped policy loss and clipped value loss, with every statistic on the device.

``loss_agg`` aggregates the per-token losses l (see each op) over valid tokens (mask true):
    "token-mean"               sum(l) / (num_tokens if given, else the number of valid tokens)
    "seq-mean-token-mean"      mean over rows of (row sum of l / row's valid count)
    "seq-mean-token-sum"       mean over rows of the row sum of l
    "seq-mean-token-sum-norm"  sum(l) / (B * T)   (Dr. GRPO)
    "token-sum"                sum(l)
The per-row means skip rows with no valid token; a batch with no valid token gives loss 0
and zero gradient. ``num_tokens`` (a number or a 0-d tensor) is the *global* number of
valid tokens across micro-batches, so that summing the micro-batch losses equals the
full-batch loss. Nothing here syncs with the device: a tensor ``num_tokens`` is read by
the kernels and the statistics stay on the device.

On the native backends the whole call is one dispatcher call, forward and backward: the ops
(csrc/include/rlhf/ppo_op.h, their two policy forwards) and their autograd are C++.
"""

import math

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._layout import (LOSS_AGG_CODES, POLICY_OPTIONS, POLICY_STATS, VALUE_STATS, option_codes,
                                  pack_options)
from rlhf_kernels._signatures import f32, loss_outputs, shape
from rlhf_kernels._stats import stats as _stats
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import ppo as ref

NATIVE = _backend.NATIVE
if _ext.loaded():
    _policy_fwd = torch.ops.rlhf_kernels.ppo_policy_fwd.default                  # the plain loss
    _policy_fwd_options = torch.ops.rlhf_kernels.ppo_policy_options_fwd.default  # under options
    _value_fwd = torch.ops.rlhf_kernels.ppo_value_fwd.default


_OPTION_CODES = {field: option_codes(field) for field, _ in POLICY_OPTIONS}


def _loss_agg_code(op, loss_agg):
    code = LOSS_AGG_CODES.get(loss_agg) if loss_agg.__class__ is str else None  # a valid one: no second call
    return v.choice(op, "loss_agg", loss_agg, LOSS_AGG_CODES) if code is None else code


def _policy_options(op, ratio_level, objective, is_correction, is_level):
    """The native ops' `options` int (bit layout: rlhf_kernels/_layout.py); unknown values raise."""
    values = dict(ratio_level=ratio_level, objective=objective, is_correction=is_correction, is_level=is_level)
    return pack_options(**{f: v.choice(op, f, x, _OPTION_CODES[f], quote=True) for f, x in values.items()})


def _check_clips(op, clip_low, clip_high, dual_clip):
    """-> (clip_low, clip_high, dual_clip) checked, as ``ppo_policy_loss``'s Args say."""
    clip_low = v.number(op, "clip_low", clip_low, lo=0.0)
    clip_high = clip_low if clip_high is None else v.number(op, "clip_high", clip_high, lo=0.0)
    return clip_low, clip_high, v.number(op, "dual_clip", dual_clip, lo=1.0, lo_open=True, allow_none=True)


def _check_policy_options(op, rollout_logprobs, is_correction, is_level, is_cap, dual_clip, objective, logprobs):
    """The Python backends' checks of the options' arguments, as check_policy_options in
    csrc/include/rlhf/ppo_op.h. Returns (rollout_logprobs as float32 or None, is_cap)."""
    if is_correction is not None and rollout_logprobs is None:
        raise ValueError("%s: `is_correction` needs `rollout_logprobs` (the rollout engine's log-probabilities)" % op)
    if is_correction is None and rollout_logprobs is not None:
        raise ValueError('%s: `rollout_logprobs` given without `is_correction` ("tis" or "mis"); it would be ignored'
                         % op)
    for name, value in (("is_level", is_level), ("is_cap", is_cap)):
        if is_correction is None and value is not None:
            raise ValueError("%s: `%s` given without `is_correction`; it would be ignored" % (op, name))
    is_cap = v.number(op, "is_cap", is_cap, lo=1.0, lo_open=True, allow_none=True)
    if is_cap is not None and math.isinf(is_cap):
        raise ValueError("%s: `is_cap` must be a finite number > 1, got %r" % (op, is_cap))
    if objective == "cispo" and dual_clip is not None:
        raise ValueError('%s: `dual_clip` cannot be used with objective "cispo" (its loss has no clipped branch to cap)'
                         % op)
    if rollout_logprobs is None:
        return None, 2.0
    v.floats(op, ("logprobs", "rollout_logprobs"), (logprobs, rollout_logprobs))  # logprobs: checked before
    return v.as_f32(rollout_logprobs.detach()), 2.0 if is_cap is None else is_cap


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    loss_agg="token-mean", num_tokens=None, ratio_level="token", objective="ppo",
                    rollout_logprobs=None, is_correction=None, is_level=None, is_cap=None, backend="auto"):
    """Clipped PPO policy loss with asymmetric and dual clipping, GSPO's sequence-level ratio,
    CISPO, and the truncated or masked correction for a rollout engine's log-probabilities.

    Per token, ratio = exp(logp - old_logp), or the row's sequence ratio (``ratio_level``);
    objective "ppo": l = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)),
    dual_clip=c caps tokens with A < 0 at -A * c; objective "cispo":
    l = -sg(clip(ratio, 1 - clip_low, 1 + clip_high)) * A * logp (sg: no gradient through it);
    with ``is_correction`` each l is multiplied by a constant behaviour weight. The per-token
    losses are then aggregated by ``loss_agg``.

    Args:
        logprobs: [B, T] float (fp32/bf16/fp16), log pi(y_t) of the current policy; the
            only input that receives a gradient.
        old_logprobs: [B, T] float, log pi_old(y_t) (treated as constant).
        advantages: [B, T] float (treated as constant).
        mask: [B, T] bool or integer (nonzero = the token counts). Float masks are refused.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high]; clip_high=None
            means clip_low.
        dual_clip: None, or c > 1: tokens with A < 0 have their loss capped at -A * c (not
            with objective "cispo").
        loss_agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
            "seq-mean-token-sum-norm" or "token-sum" (see the module docstring).
        num_tokens: None, a number > 0, or a 0-d tensor on the inputs' device: the global
            normalizer of "token-mean" (ignored by the other modes).
        ratio_level: "token", or "sequence" (GSPO): every valid token of a row uses
            s = exp(mean over the row's valid tokens of logp - old_logp), whose gradient
            reaches each of them (ds/dlogp_t = s / n).
        objective: "ppo" or "cispo".
        rollout_logprobs: None, or [B, T] float: the rollout engine's log-probabilities of
            the sampled tokens (a constant), for ``is_correction``.
        is_correction: None, "tis" or "mis": each token's loss is multiplied by
            min(w, is_cap) ("tis"), or by w where w <= is_cap and 0 above ("mis": such tokens
            still count in the normalizer), w = exp(old_logp - rollout_logprobs) per token.
        is_level: (with is_correction; default "token") "token", or one w per row:
            exp(sum over its valid tokens of old_logp - rollout_logprobs) ("sequence") or
            exp of their mean ("geometric"). A w that overflows is above the cap.
        is_cap: (with is_correction; default 2.0) a finite number > 1.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (loss, stats): loss a 0-d float32 tensor; stats a read-only mapping of 0-d float32
        tensors over the valid tokens (0 when there is none): clipfrac = clipfrac_low +
        clipfrac_high, the fraction of tokens clipped below / above the range (objective
        "ppo": the clipped term strictly larger than the unclipped one; "cispo": the ratio
        outside the range), dual_clipfrac, approx_kl (mean of (r - 1) - log r of each
        token's own ratio r), ratio_mean, ratio_min, ratio_max (of the ratio the loss uses),
        seq_clipfrac (the fraction of rows with a valid token that have a clipped one),
        is_weight_mean (the applied weight's mean, 1 without correction) and is_capped_frac
        (the fraction of tokens with w > is_cap, truncated or masked); ``stats.packed`` holds
        all of them in one tensor.
    """
    op = "ppo_policy_loss"
    name = _backend.pick(backend, logprobs, op, "logprobs")
    # host time per call is budgeted (benchmarks/bench_overhead.py): the common cases inline
    agg = _loss_agg_code(op, loss_agg)
    plain = (rollout_logprobs is None and is_correction is None and is_level is None and is_cap is None
             and ratio_level == "token" and objective == "ppo")
    options = 0 if plain else _policy_options(op, ratio_level, objective, is_correction, is_level)
    if name in NATIVE:
        nt, nt_value = (None, None) if num_tokens is None else v.num_tokens_args(op, num_tokens)
        args = (logprobs, old_logprobs, advantages, mask, nt, nt_value, clip_low, clip_high, dual_clip, agg)
        try:
            if plain:
                loss, packed, _ = _policy_fwd(*args)
            else:
                loss, packed, _ = _policy_fwd_options(*args, rollout_logprobs, options, is_cap)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return loss, _stats(POLICY_STATS, packed)
    v.floats(op, ("logprobs", "old_logprobs", "advantages"), (logprobs, old_logprobs, advantages), 2, mask)
    clip_low, clip_high, dual_clip = _check_clips(op, clip_low, clip_high, dual_clip)
    roll, cap = _check_policy_options(op, rollout_logprobs, is_correction, is_level, is_cap, dual_clip, objective,
                                      logprobs)
    nt = v.num_tokens(op, num_tokens, logprobs.device)
    lp, olp, adv, m = v.as_f32(logprobs), v.as_f32(old_logprobs), v.as_f32(advantages), v.as_mask(mask)
    if name == "torch":
        kw = {} if plain else dict(ratio_level=ratio_level, objective=objective, is_correction=is_correction,
                                   rollout_logprobs=None if roll is None else roll.double(),
                                   is_level=is_level or "token", is_cap=cap)
        loss, stats = ref.ppo_policy_loss(lp.double(), olp.detach().double(), adv.detach().double(), m,
                                          clip_low, clip_high, dual_clip, loss_agg, nt, **kw)
        return loss.float(), _stats(POLICY_STATS, torch.stack([stats[k] for k in POLICY_STATS]).float())
    from rlhf_kernels.triton import ppo as tri
    loss, packed, _ = tri.policy_forward(lp, olp.detach(), adv.detach(), m, nt, clip_low, clip_high, dual_clip, agg,
                                         roll, options, cap)
    return loss, _stats(POLICY_STATS, packed)


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, loss_agg="token-mean", num_tokens=None,
                   backend="auto"):
    """Clipped value loss: per token l = 0.5 * max((V - R)^2, (clamp(V, V_old - clip, V_old +
    clip) - R)^2), aggregated by ``loss_agg``.

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
        nt, nt_value = v.num_tokens_args(op, num_tokens)
        try:
            loss, packed, _ = _value_fwd(values, old_values, returns, mask, nt, nt_value, clip, agg)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return loss, _stats(VALUE_STATS, packed)
    v.floats(op, ("values", "old_values", "returns"), (values, old_values, returns), 2, mask)
    clip = v.number(op, "clip", clip, lo=0.0, lo_open=True, allow_none=True)
    nt = v.num_tokens(op, num_tokens, values.device)
    val, ov, ret, m = v.as_f32(values), v.as_f32(old_values), v.as_f32(returns), v.as_mask(mask)
    if name == "torch":
        loss, stats = ref.ppo_value_loss(val.double(), ov.detach().double(), ret.detach().double(), m, clip,
                                         loss_agg, nt)
        return loss.float(), _stats(VALUE_STATS, torch.stack([stats[k] for k in VALUE_STATS]).float())
    from rlhf_kernels.triton import ppo as tri
    loss, packed, _ = tri.value_forward(val, ov.detach(), ret.detach(), m, nt, clip, agg)
    return loss, _stats(VALUE_STATS, packed)


# ---- output shapes of the native ops and their Triton twins (rlhf_kernels/_signatures.py) ----

@shape("ppo_policy_fwd", "ppo_policy_options_fwd")
def _policy_shapes(logprobs, **_):
    return loss_outputs(logprobs, len(POLICY_STATS))


@shape("ppo_value_fwd")
def _value_shapes(values, **_):
    return loss_outputs(values, len(VALUE_STATS))


@shape("ppo_policy_bwd")
def _policy_grad_shape(logprobs, **_):
    return f32(logprobs, logprobs.shape)


@shape("ppo_value_bwd")
def _value_grad_shape(values, **_):
    return f32(values, values.shape)
