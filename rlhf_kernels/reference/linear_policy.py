"""The policy head, hidden states straight to the policy objective, in eager PyTorch.

    logp, H = token_logprobs(hidden @ weight.T + bias, labels, temperature)   (reference/logprobs.py)
    loss    = ppo_policy_loss(logp, old_logprobs, advantages, mask, ...)       (reference/ppo.py)
              - entropy_coef * agg(H) + kl_coef * agg(kl_penalty(logp, ref_logprobs, kl_kind))
agg: the same ``loss_agg`` and ``num_tokens`` as the policy loss, over the valid tokens (mask
true). Labels at masked positions are never read; logp and H are 0 there.

``linear_policy_loss`` builds the whole [B, T, V] logits (``logits_policy_loss`` takes them): the
test oracle (run in float64).
``chunked_linear_policy_loss`` is the ``torch`` backend: the log-probabilities and entropy of
chunked_linear_token_logprobs (tokens in chunks, each chunk's float32 logits recomputed in the
backward), then the loss terms in float64 on the [B, T] values.
"""

import torch

from rlhf_kernels._layout import LINEAR_POLICY_STATS  # noqa: F401 (re-exported)
from rlhf_kernels.reference.linear_logprobs import chunked_linear_token_logprobs
from rlhf_kernels.reference.logprobs import kl_penalty, token_logprobs
from rlhf_kernels.reference.ppo import _masked_mean, aggregate, ppo_policy_loss

# labels of masked positions are replaced by this ignore_index before token_logprobs (a valid
# position's label, in range or not, is never equal to it)
_MASKED = torch.iinfo(torch.int64).min


def _masked_labels(labels, mask):
    return torch.where(mask, labels.long(), _MASKED)


def policy_head_loss(logp, entropy, old_logprobs, advantages, mask, ref_logprobs=None, kl_coef=0.0, kl_kind="k3",
                     entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, loss_agg="token-mean",
                     num_tokens=None, **options):
    """The loss and statistics from the per-token logp and entropy [B, T] (0 where masked).
    ``options``: ppo_policy_loss's ratio_level, objective, rollout_logprobs, is_correction,
    is_level, is_cap. Returns (loss 0-d, stats dict of 0-d tensors: ppo_policy_loss's, then
    entropy and kl, the means over valid tokens; kl is 0 without ref_logprobs)."""
    loss, stats = ppo_policy_loss(logp, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip, loss_agg,
                                  num_tokens, **options)
    count = mask.sum(dtype=logp.dtype)
    if entropy_coef != 0:
        loss = loss - entropy_coef * aggregate(entropy, mask, loss_agg, num_tokens)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        kl = kl_penalty(logp, ref_logprobs, kl_kind)
        loss = loss + kl_coef * aggregate(kl, mask, loss_agg, num_tokens)
    stats["entropy"] = _masked_mean(entropy.detach(), mask, count)
    stats["kl"] = _masked_mean(kl.detach(), mask, count)
    return loss, stats


def logits_policy_loss(logits, labels, old_logprobs, advantages, mask, temperature=1.0, ref_logprobs=None,
                       kl_coef=0.0, kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                       loss_agg="token-mean", num_tokens=None, **options):
    """The same from the logits [B, T, V]: (loss, stats, logp [B, T]) in the logits' dtype."""
    logp, entropy = token_logprobs(logits, _masked_labels(labels, mask), temperature, _MASKED)
    loss, stats = policy_head_loss(logp, entropy, old_logprobs, advantages, mask, ref_logprobs, kl_coef, kl_kind,
                                   entropy_coef, clip_low, clip_high, dual_clip, loss_agg, num_tokens, **options)
    return loss, stats, logp.detach()


def linear_policy_loss(hidden, weight, labels, old_logprobs, advantages, mask, bias=None, temperature=1.0,
                       ref_logprobs=None, kl_coef=0.0, kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None,
                       dual_clip=None, loss_agg="token-mean", num_tokens=None, **options):
    """hidden [B, T, H], weight [V, H], bias [V] or None, the others [B, T] (mask bool) ->
    (loss, stats, logp [B, T]) in the inputs' dtype, through the whole [B, T, V] logits.
    ``options``: as policy_head_loss's."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits_policy_loss(logits, labels, old_logprobs, advantages, mask, temperature, ref_logprobs, kl_coef,
                              kl_kind, entropy_coef, clip_low, clip_high, dual_clip, loss_agg, num_tokens, **options)


def chunked_linear_policy_loss(hidden, weight, labels, old_logprobs, advantages, mask, bias=None, temperature=1.0,
                               ref_logprobs=None, kl_coef=0.0, kl_kind="k3", entropy_coef=0.0, clip_low=0.2,
                               clip_high=None, dual_clip=None, loss_agg="token-mean", num_tokens=None, **options):
    """As linear_policy_loss, never holding more than one chunk of float32 logits: returns the
    float64 (loss, stats) and the float32 logp [B, T]."""
    B, T, H = hidden.shape
    y = _masked_labels(labels, mask).reshape(-1)
    lp, ent = chunked_linear_token_logprobs(hidden.reshape(B * T, H), weight, y, bias, temperature, _MASKED)
    lp, ent = lp.reshape(B, T), ent.reshape(B, T)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    if options.get("rollout_logprobs") is not None:
        options = dict(options, rollout_logprobs=f64(options["rollout_logprobs"]))
    loss, stats = policy_head_loss(lp.double(), ent.double(), f64(old_logprobs), f64(advantages), mask,
                                   f64(ref_logprobs), kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip,
                                   loss_agg, num_tokens, **options)
    return loss, stats, lp.detach()
