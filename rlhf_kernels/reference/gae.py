"""GAE, packed GAE and masked whitening, written as the plain loops they are."""

import torch


def gae(rewards, values, mask, gamma, lam, last_values=None):
    """rewards, values: [B, T] float; mask: [B, T] bool; last_values: [B] or None.

    Walks each row backwards. A masked step is skipped: it adds no TD error, does not
    break the chain, and the "next value" seen by an unmasked step is the value of the
    next unmasked step (or ``last_values``, or 0). Advantages and returns are 0 there.
    Returns (advantages, returns), both [B, T] in the input dtype.
    """
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    if last_values is not None:
        next_value = last_values.to(rewards.dtype).clone()
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_adv = torch.where(valid, adv_t, next_adv)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, adv_t, torch.zeros_like(adv_t))
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def gae_packed(rewards, values, cu_seqlens, gamma, lam, last_values=None, mask=None):
    """rewards, values: [N]; cu_seqlens: [B+1] offsets; mask: [N] bool or None.

    Each sequence cu_seqlens[b]:cu_seqlens[b+1] is an independent row of ``gae``.
    """
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        s, e = bounds[b], bounds[b + 1]
        if e == s:
            continue
        m = torch.ones(e - s, dtype=torch.bool, device=rewards.device) if mask is None else mask[s:e]
        lv = None if last_values is None else last_values[b:b + 1]
        a, r = gae(rewards[None, s:e], values[None, s:e], m[None], gamma, lam, lv)
        advantages[s:e], returns[s:e] = a[0], r[0]
    return advantages, returns


def masked_whiten(x, mask, shift_mean=True, unbiased=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the positions where ``mask`` is true; 0 elsewhere.

    ``unbiased`` divides the variance by n - 1 (0 when n < 2); ``shift_mean=False`` adds
    the mean back, keeping the original centre.
    """
    valid = x[mask]
    n = valid.numel()
    mean = valid.sum() / n if n > 0 else x.new_zeros(())
    denom = n - 1 if unbiased else n
    var = ((valid - mean) ** 2).sum() / denom if denom > 0 else x.new_zeros(())
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))
