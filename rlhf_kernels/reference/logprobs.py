"""Per-token log-probabilities, entropy and KL, written the obvious eager way.

With ``s = logits / temperature`` over the last dimension (the vocabulary, size V):
    logp_t    = log_softmax(s_t)[y_t]
    entropy_t = -sum_v p_tv * log p_tv,              p_t = softmax(s_t)
    full_kl_t = sum_v p_tv * (log p_tv - log q_tv),  q_t = softmax(ref_logits_t / temperature)
Positions whose label equals ``ignore_index`` give 0 (logp and entropy); a label outside
[0, V) other than ``ignore_index`` gives NaN (logp and entropy) and no gradient (the public
ops raise for one first, unless called with ``validate=False``).
They compute in the dtype they are given: tests call them on float64 inputs.
"""

import torch


def token_logprobs(logits, labels, temperature=1.0, ignore_index=-100):
    """logits [..., V] float, labels [...] int -> (logp [...], entropy [...]) in logits' dtype."""
    s = logits / temperature
    logp_all = torch.log_softmax(s, dim=-1)
    ignored = labels == ignore_index
    outside = ~ignored & ((labels < 0) | (labels >= logits.shape[-1]))
    safe = torch.where(ignored | outside, torch.zeros_like(labels), labels).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = _entropy_from_logp(logp_all)
    zero, nan = torch.zeros_like(logp), torch.full_like(logp, float("nan"))
    logp, entropy = torch.where(outside, nan, logp), torch.where(outside, nan, entropy)
    return torch.where(ignored, zero, logp), torch.where(ignored, zero, entropy)


def token_entropy(logits, temperature=1.0):
    """logits [..., V] float -> entropy [...] of softmax(logits / temperature)."""
    return _entropy_from_logp(torch.log_softmax(logits / temperature, dim=-1))


def _entropy_from_logp(logp_all):
    # p * log p is taken as 0 where p == 0 (a -inf logit), as in the limit; the where
    # comes before the product so that autograd never sees 0 * -inf either
    p = logp_all.exp()
    return -(p * torch.where(p > 0, logp_all, torch.zeros_like(p))).sum(-1)


def full_kl(logits, ref_logits, temperature=1.0):
    """KL(pi || pi_ref) over the vocabulary: [..., V] twice -> [...]."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits / temperature, dim=-1)
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logq, torch.zeros_like(p))).sum(-1)


def kl_penalty(logprobs, ref_logprobs, kind="k1", clamp=None):
    """Per-token KL estimate from sampled log-probabilities, log_r = logprobs - ref_logprobs:
    k1 = log_r, k2 = log_r**2 / 2, k3 = exp(-log_r) - 1 + log_r, abs = |log_r|;
    ``clamp=c`` clamps the estimate to [-c, c]."""
    log_r = logprobs - ref_logprobs
    if kind == "k1":
        out = log_r
    elif kind == "k2":
        out = 0.5 * log_r ** 2
    elif kind == "k3":
        out = torch.exp(-log_r) - 1 + log_r
    elif kind == "abs":
        out = log_r.abs()
    else:
        raise ValueError("kl_penalty: `kind` must be one of 'k1', 'k2', 'k3', 'abs', got %r" % (kind,))
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    return out
