"""PPO clipped policy loss and clipped value loss, written as the formulas they are.

Aggregation (``loss_agg``) over valid tokens, l the per-token loss, [B, T] inputs:
    token-mean               sum(l) / (num_tokens if given, else the number of valid tokens)
    seq-mean-token-mean      mean over sequences of (sum of the row's l / its valid count)
    seq-mean-token-sum       mean over sequences of the row's sum of l
    seq-mean-token-sum-norm  sum(l) / (B * T)
    token-sum                sum(l)
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
    if loss_agg == "token-sum":
        return l.sum()
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


def _row_mean(x, mask):
    """[B, T] -> [B, 1]: the mean of x over each row's valid tokens (0 for a row without any)."""
    n = mask.sum(-1, keepdim=True, dtype=x.dtype)
    return torch.where(mask, x, torch.zeros_like(x)).sum(-1, keepdim=True) / n.clamp(min=1)


def is_weights(old_logprobs, rollout_logprobs, mask, is_correction, is_level, is_cap):
    """The behaviour correction, a constant: (applied weight c [B, T], capped [B, T] bool).

    log w = old - rollout per token ("token"), its sum over the row's valid tokens
    ("sequence") or their mean ("geometric"); w = exp(log w) (inf when it overflows, which
    is above any cap); "tis": c = min(w, is_cap); "mis": c = w where w <= is_cap, else 0.
    """
    log_w = (old_logprobs - rollout_logprobs).detach()
    if is_level == "sequence":
        log_w = torch.where(mask, log_w, torch.zeros_like(log_w)).sum(-1, keepdim=True).expand_as(log_w)
    elif is_level == "geometric":
        log_w = _row_mean(log_w, mask).expand_as(log_w)
    w = torch.exp(log_w)
    capped = w > is_cap
    above = torch.full_like(w, is_cap if is_correction == "tis" else 0.0)
    return torch.where(capped, above, w), capped


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=None,
                    dual_clip=None, loss_agg="token-mean", num_tokens=None, ratio_level="token",
                    objective="ppo", rollout_logprobs=None, is_correction=None, is_level="token", is_cap=2.0):
    """[B, T] each (mask bool). Returns (loss 0-d, stats dict of 0-d tensors).

    ratio = exp(logp - old_logp), or with ratio_level="sequence" the row's
    s = exp(mean over its valid tokens of logp - old_logp) for each of its tokens (GSPO);
    objective "ppo": l = max(-A*ratio, -A*clip(ratio, 1-clip_low, 1+clip_high)), with
    dual_clip=c tokens with A < 0 take min(l, -A*c);
    objective "cispo": l = -sg(clip(ratio, 1-clip_low, 1+clip_high)) * A * logp;
    is_correction "tis" / "mis": l times the constant weight of ``is_weights``.

    Stats over valid tokens: clipfrac_low / clipfrac_high count tokens whose clipped term is
    strictly larger (ppo) or whose ratio is outside the range (cispo), below / above it;
    seq_clipfrac the fraction of rows with any valid token that have a clipped one;
    approx_kl the mean of (r - 1) - log r of each token's own ratio r; ratio_mean / min / max
    of the ratio the loss uses; is_weight_mean the mean applied weight (1 without correction),
    is_capped_frac the fraction of tokens whose w was truncated or masked (w > is_cap).
    """
    if clip_high is None:
        clip_high = clip_low
    log_ratio = logprobs - old_logprobs
    own = torch.exp(log_ratio)
    ratio = torch.exp(_row_mean(log_ratio, mask)).expand_as(own) if ratio_level == "sequence" else own
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    dual = torch.zeros_like(mask)
    if objective == "ppo":
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, lo, hi)
        l = torch.maximum(unclipped, clipped)
        clip_wins = clipped > unclipped
        if dual_clip is not None:
            cap = -advantages * dual_clip
            dual = (advantages < 0) & (cap < l)
            l = torch.where(advantages < 0, torch.minimum(l, cap), l)
        low, high = clip_wins & (ratio < lo), clip_wins & (ratio > hi)
    elif objective == "cispo":
        l = -torch.clamp(ratio, lo, hi).detach() * advantages * logprobs
        low, high = ratio < lo, ratio > hi
    else:
        raise ValueError("unknown objective %r" % (objective,))
    weight, capped = torch.ones_like(l), torch.zeros_like(mask)
    if is_correction is not None:
        weight, capped = is_weights(old_logprobs, rollout_logprobs, mask, is_correction, is_level, is_cap)
        l = weight * l
    loss = aggregate(l, mask, loss_agg, num_tokens)

    with torch.no_grad():
        count = mask.sum(dtype=l.dtype)
        frac_low = _masked_mean(low.to(l.dtype), mask, count)
        frac_high = _masked_mean(high.to(l.dtype), mask, count)
        r = ratio.detach()
        any_valid = count > 0
        rows = mask.any(-1)
        rows_clipped = ((low | high) & mask).any(-1)
        stats = {
            "clipfrac": frac_low + frac_high,
            "clipfrac_low": frac_low,
            "clipfrac_high": frac_high,
            "dual_clipfrac": _masked_mean(dual.to(l.dtype), mask, count),
            "approx_kl": _masked_mean((own.detach() - 1) - log_ratio.detach(), mask, count),
            "ratio_mean": _masked_mean(r, mask, count),
            "ratio_min": _masked_extreme(r, mask, any_valid, torch.amin, float("inf")),
            "ratio_max": _masked_extreme(r, mask, any_valid, torch.amax, -float("inf")),
            "seq_clipfrac": rows_clipped.sum(dtype=l.dtype) / rows.sum(dtype=l.dtype).clamp(min=1),
            "is_weight_mean": _masked_mean(weight, mask, count),
            "is_capped_frac": _masked_mean(capped.to(l.dtype), mask, count),
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
