"""PPO clipped policy loss and clipped value loss, written as the formulas they are.

Aggregation (``loss_agg``) over valid tokens, l the per-token loss, [B, T] inputs:
    token-mean               sum(l) / (num_tokens if given, else the number of valid tokens)
    seq-mean-token-mean      mean over sequences of (sum of the row's l / its valid count)
    seq-mean-token-sum       mean over sequences of the row's sum of l
    seq-mean-token-sum-norm  sum(l) / (B * T)
The two per-sequence means skip rows with no valid token; a batch with no valid token
gives loss 0 (and zero gradient). Statistics are over the batch's valid tokens and are 0
when there is none.
"""

import torch

from rlhf_kernels._layout import LOSS_AGGS, POLICY_STATS, VALUE_STATS  # noqa: F401 (re-exported)


def aggregate(l, mask, loss_agg, num_tokens=None):
    """Aggregate the per-token loss ``l`` [B, T] over ``mask`` [B, T] (bool)."""
    l = torch.where(mask, l, torch.zeros_like(l))
    count = mask.sum(dtype=l.dtype)
    zero = l.sum() * 0
    if loss_agg == "token-mean":
        denom = count if num_tokens is None else torch.as_tensor(num_tokens, dtype=l.dtype, device=l.device)
        return torch.where(count > 0, l.sum() / torch.where(count > 0, denom, 1), zero)
    if loss_agg == "seq-mean-token-sum-norm":
        return l.sum() / max(l.numel(), 1)
    row_count = mask.sum(-1, dtype=l.dtype)
    row_sum = l.sum(-1)
    has = row_count > 0
    n_seq = has.sum(dtype=l.dtype)
    if loss_agg == "seq-mean-token-mean":
        per_seq = torch.where(has, row_sum / torch.where(has, row_count, 1), torch.zeros_like(row_sum))
    elif loss_agg == "seq-mean-token-sum":
        per_seq = torch.where(has, row_sum, torch.zeros_like(row_sum))
    else:
        raise ValueError("unknown loss_agg %r" % (loss_agg,))
    return torch.where(n_seq > 0, per_seq.sum() / torch.where(n_seq > 0, n_seq, 1), zero)


def _masked_mean(x, mask, count):
    return torch.where(mask, x, torch.zeros_like(x)).sum() / count.clamp(min=1)


def _masked_extreme(x, mask, any_valid, reduce, fill):
    if x.numel() == 0:
        return x.new_zeros(())
    return torch.where(any_valid, reduce(torch.where(mask, x, torch.full_like(x, fill))), x.new_zeros(()))


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=None,
                    dual_clip=None, loss_agg="token-mean", num_tokens=None):
    """[B, T] each (mask bool). Returns (loss 0-d, stats dict of 0-d tensors).

    ratio = exp(logp - old_logp); l = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high));
    with dual_clip=c, tokens with A < 0 take min(l, -A*c).
    """
    if clip_high is None:
        clip_high = clip_low
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, lo, hi)
    l = torch.maximum(unclipped, clipped)
    clip_wins = clipped > unclipped
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual = (advantages < 0) & (cap < l)
        l = torch.where(advantages < 0, torch.minimum(l, cap), l)
    loss = aggregate(l, mask, loss_agg, num_tokens)

    with torch.no_grad():
        count = mask.sum(dtype=l.dtype)
        frac_low = _masked_mean((clip_wins & (ratio < lo)).to(l.dtype), mask, count)
        frac_high = _masked_mean((clip_wins & (ratio > hi)).to(l.dtype), mask, count)
        r = ratio.detach()
        any_valid = count > 0
        stats = {
            "clipfrac": frac_low + frac_high,
            "clipfrac_low": frac_low,
            "clipfrac_high": frac_high,
            "dual_clipfrac": _masked_mean(dual.to(l.dtype), mask, count),
            "approx_kl": _masked_mean((r - 1) - log_ratio.detach(), mask, count),
            "ratio_mean": _masked_mean(r, mask, count),
            "ratio_min": _masked_extreme(r, mask, any_valid, torch.amin, float("inf")),
            "ratio_max": _masked_extreme(r, mask, any_valid, torch.amax, -float("inf")),
        }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip=0.2, loss_agg="token-mean", num_tokens=None):
    """[B, T] each (mask bool). Returns (loss 0-d, stats dict of 0-d tensors).

    l = 0.5 * max((V - R)^2, (clamp(V, V_old - clip, V_old + clip) - R)^2); clip=None: 0.5*(V - R)^2.
    explained_var = 1 - Var(R - V) / Var(R) over valid tokens (population variances),
    0 when Var(R) = 0 or there is no valid token.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        l = 0.5 * unclipped
        clip_wins = torch.zeros_like(mask)
    else:
        v_clipped = torch.clamp(values, old_values - clip, old_values + clip)
        clipped = (v_clipped - returns) ** 2
        l = 0.5 * torch.maximum(unclipped, clipped)
        clip_wins = clipped > unclipped
    loss = aggregate(l, mask, loss_agg, num_tokens)
    with torch.no_grad():
        count = mask.sum(dtype=l.dtype)
        R = returns.detach()
        err = R - values.detach()

        def var(x):
            m = _masked_mean(x, mask, count)
            return _masked_mean((x - m) ** 2, mask, count)

        var_r = var(R)
        ev = torch.where(var_r > 0, 1 - var(err) / torch.where(var_r > 0, var_r, 1), count * 0)
        stats = {"vf_clipfrac": _masked_mean(clip_wins.to(l.dtype), mask, count), "explained_var": ev}
    return loss, stats
