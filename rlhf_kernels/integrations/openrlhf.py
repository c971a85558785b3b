"""Drop-in replacements for OpenRLHF's hot functions, and ``patch()`` to swap them in.

    import rlhf_kernels.integrations.openrlhf as rk_openrlhf
    rk_openrlhf.patch()      # in each process that builds the actor/critic/experience maker

Supported: OpenRLHF whose functions have the signatures below (checked by ``patch()``;
tested with openrlhf 0.11.2). Each replacement has the signature, semantics and return
convention of OpenRLHF's function and runs on our ops. The loss classes and the experience
maker are patched at the method, so instances built before ``patch()`` use ours too.

| OpenRLHF | ours | differences |
|---|---|---|
| models.utils.log_probs_from_logits(logits, labels, temperature=1.0) | rk.token_logprobs | float32 statistics for bf16 logits; like OpenRLHF it divides the caller's logits by temperature in place; label -100 gives 0 where OpenRLHF takes flash-attn's cross entropy (float32 logits with flash-attn installed) and raises elsewhere |
| models.utils.compute_entropy(logits) | rk.token_entropy | no torch.compile needed |
| models.utils.compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False) | rk.kl_penalty(clamp=10) | k3 via expm1 (OpenRLHF's exp(-x) - 1 + x cancels near 0) |
| models.loss.PolicyLoss.forward (policy_loss_type "ppo" or "gspo", is_correction_level="off") | rk.ppo_policy_loss (ratio_level="sequence" for gspo) | one fused call |
| models.loss.ValueLoss.forward | rk.ppo_value_loss | V_old + clamp(V - V_old) written as clamp(V, V_old -+ c): equal up to rounding |
| trainer.ppo_utils.experience_maker.RemoteExperienceMaker.get_advantages_and_returns(values, rewards, action_mask, gamma, lambd) | rk.gae | one call instead of a T-step loop, float64 carries |
| ...RemoteExperienceMaker.get_cumulative_returns(rewards, action_mask, gamma) | rk.gae(values=0, lam=1) | as above |

Where OpenRLHF divides by a count that is zero (no action token in the micro-batch and no
global count), its loss and statistics are NaN and ours are 0 (with zero gradient).

Not replaced, and why (the call goes to OpenRLHF's function, with a one-time FallThroughWarning
for an option we do not implement; without a warning where OpenRLHF itself raises):
- float64 logits (our ops output float32);
- PolicyLoss with an importance-sampling correction (is_correction_level != "off"): OpenRLHF
  gates the weight to a band [low, high] (default [0.5, 5]) and, at sequence level, keeps each
  token's own weight in the surviving sequences; our op caps from above only, with one weight
  per sequence at sequence level; with GSPO, OpenRLHF then takes the ratio against the rollout's
  log-probabilities instead;
- a ValueLoss with clip_eps = 0;
- masks with values other than 0 and 1 (OpenRLHF weights tokens by the mask; for a non-bool
  mask that check is one host sync on a GPU; OpenRLHF's action masks are bool);
- masked_normalize (per-row statistics; our masked_whiten pools the whole tensor), masked_mean,
  aggregate_loss (it aggregates an arbitrary loss matrix), compute_reward, and the group
  baselines (rloo, group_norm, ...) written inline in compute_advantages_and_returns.
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels.integrations._common import (FallThroughWarning, Integration, Replacement, UnsupportedVersion,
                                               as_bool_mask, clamp_log_ratio, kernel_dtype, never_label,
                                               rows_with_tokens, unit_interval)

__all__ = ["patch", "unpatch", "is_patched", "log_probs_from_logits", "compute_entropy", "compute_approx_kl",
           "policy_loss_forward", "value_loss_forward", "get_advantages_and_returns", "get_cumulative_returns",
           "UnsupportedVersion", "FallThroughWarning"]

TESTED_VERSION = "0.11.2"
UTILS = "openrlhf.models.utils:"
LOSS = "openrlhf.models.loss:"
MAKER = "openrlhf.trainer.ppo_utils.experience_maker:RemoteExperienceMaker."
FLOAT64 = "float64 inputs (our ops output float32)"
WEIGHTED_MASK = "an action_mask with values other than 0 and 1 (OpenRLHF weights tokens by them)"

_flash_ce = None


def _flash_cross_entropy():
    """Whether flash-attn's cross entropy imports here (OpenRLHF tries it on every call)."""
    global _flash_ce
    if _flash_ce is None:
        try:
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss  # noqa: F401
            _flash_ce = True
        except ImportError:
            _flash_ce = False
    return _flash_ce


def log_probs_from_logits(logits, labels, temperature=1.0):
    """OpenRLHF's log_probs_from_logits: divides ``logits`` by ``temperature`` in place (as
    OpenRLHF does), then log softmax(logits) at ``labels``; logits [..., V] -> [...] in the
    logits' dtype."""
    if not kernel_dtype(logits):
        return _OPENRLHF.fall_through("log_probs_from_logits", FLOAT64, logits, labels, temperature)
    if temperature != 1.0:
        logits.div_(temperature)
    flash = logits.dtype == torch.float32 and _flash_cross_entropy()
    return rk.token_logprobs(logits, labels, ignore_index=-100 if flash else never_label(labels)).to(logits.dtype)


def compute_entropy(logits):
    """OpenRLHF's compute_entropy: entropy of softmax(logits) per position, [..., V] -> [...]."""
    if not kernel_dtype(logits):
        return _OPENRLHF.fall_through("compute_entropy", FLOAT64, logits)
    return rk.token_entropy(logits).to(logits.dtype)


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False):
    """OpenRLHF's compute_approx_kl: the k1/k2/k3 estimate of KL(pi || pi_base) per token,
    clamped to [-10, 10], float32. With ``unbiased_gradient`` the same value with the gradient
    of w * k2, w = pi / pi_old clamped to at most KL_IS_WEIGHT_CLIP (straight through)."""
    if kl_estimator not in ("k1", "k2", "k3"):  # OpenRLHF raises
        return _OPENRLHF.call_original("compute_approx_kl", log_probs, log_probs_base, log_probs_old, kl_estimator,
                                       unbiased_gradient)
    value = rk.kl_penalty(log_probs, log_probs_base, kl_estimator, clamp=10.0)
    if not unbiased_gradient:
        return value
    if log_probs_old is None:
        weight = 1.0
    else:
        cap = _OPENRLHF.original(UTILS + "compute_approx_kl").__globals__.get("KL_IS_WEIGHT_CLIP", 10.0)
        weight = (log_probs.float() - log_probs_old.float()).exp().clamp(max=cap).detach()
    surrogate = weight * rk.kl_penalty(log_probs, log_probs_base, "k2")
    return value.detach() + surrogate - surrogate.detach()


def _aggregation(token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's aggregate_loss as our (loss_agg, num_tokens, factor): its loss = ours * factor."""
    if token_level_loss:
        if batch_num_tokens is None:
            return "token-mean", None, None
        if isinstance(batch_num_tokens, torch.Tensor):
            return "token-mean", batch_num_tokens.to(mask.device).double() / dp_size, None
        return ("token-mean", batch_num_tokens / dp_size, None) if batch_num_tokens > 0 else None
    if global_batch_size is None:
        return "seq-mean-token-mean", None, None
    if not isinstance(global_batch_size, torch.Tensor) and global_batch_size <= 0:
        return None
    return "seq-mean-token-mean", None, rows_with_tokens(mask) * dp_size / global_batch_size


def _mask(name, args, values, action_mask, dp_size, batch_num_tokens, global_batch_size, token_level_loss):
    """(bool mask, the mask our op takes, aggregation) or (None, the original's result, None)."""
    if action_mask is None:
        if not token_level_loss or batch_num_tokens is not None:  # OpenRLHF raises
            return None, _OPENRLHF.call_original(name, *args), None
        mask = torch.ones(values.shape, dtype=torch.bool, device=values.device)
        op_mask = mask
    else:
        mask, exact = as_bool_mask(action_mask)
        if exact is not None and not bool(exact):
            return None, _OPENRLHF.fall_through(name, WEIGHTED_MASK, *args), None
        op_mask = mask if action_mask.is_floating_point() else action_mask
    agg = _aggregation(token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size)
    if agg is None:
        return None, _OPENRLHF.call_original(name, *args), None
    return mask, op_mask, agg


def policy_loss_forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                        dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """OpenRLHF's PolicyLoss.forward for policy_loss_type "ppo" and "gspo" (GSPO's ratio: exp of
    the mean of the sequence's log ratios, with its gradient, for each of its tokens) without
    importance-sampling correction: (loss, clip_ratio, ppo_kl, None, None)."""
    name = "PolicyLoss.forward"
    args = (self, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size, batch_num_tokens,
            global_batch_size)
    if self.policy_loss_type not in ("ppo", "gspo"):  # OpenRLHF raises
        return _OPENRLHF.call_original(name, *args)
    if self.is_correction_level != "off":
        return _OPENRLHF.fall_through(name, "is_correction_level=%r" % self.is_correction_level, *args)
    if not all(kernel_dtype(t) for t in (log_probs, old_log_probs, advantages)):
        return _OPENRLHF.fall_through(name, FLOAT64, *args)
    mask, op_mask, agg = _mask(name, args, log_probs, action_mask, dp_size, batch_num_tokens, global_batch_size,
                               self.token_level_loss)
    if mask is None:
        return op_mask
    loss_agg, num_tokens, factor = agg
    gspo = self.policy_loss_type == "gspo"  # the sequence's ratio, unclamped; else the token's, log clamped to +-20
    loss, stats = rk.ppo_policy_loss(log_probs if gspo else clamp_log_ratio(log_probs, old_log_probs), old_log_probs,
                                     advantages, op_mask, clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
                                     dual_clip=self.dual_clip, loss_agg=loss_agg, num_tokens=num_tokens,
                                     ratio_level="sequence" if gspo else "token")
    if factor is not None:
        loss = loss * factor
    with torch.no_grad():
        weights = mask if action_mask is None else action_mask
        ppo_kl = (-(log_probs - old_log_probs) * weights).sum() / weights.sum()
    return loss.to(torch.promote_types(log_probs.dtype, advantages.dtype)), stats["clipfrac"], ppo_kl, None, None


def value_loss_forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None):
    """OpenRLHF's ValueLoss.forward: 0.5 * the aggregate of max((V - R)^2, (V_old + clamp(V - V_old,
    -clip_eps, clip_eps) - R)^2) (unclipped (V - R)^2 when clip_eps is None)."""
    name = "ValueLoss.forward"
    args = (self, values, old_values, returns, action_mask, dp_size, batch_num_tokens, global_batch_size)
    if self.clip_eps is not None and not self.clip_eps > 0:
        return _OPENRLHF.fall_through(name, "clip_eps <= 0", *args)
    if not all(kernel_dtype(t) for t in (values, old_values, returns)):
        return _OPENRLHF.fall_through(name, FLOAT64, *args)
    mask, op_mask, agg = _mask(name, args, values, action_mask, dp_size, batch_num_tokens, global_batch_size,
                               self.token_level_loss)
    if mask is None:
        return op_mask
    loss_agg, num_tokens, factor = agg
    clip = None if self.clip_eps is None else float(self.clip_eps)
    loss, _ = rk.ppo_value_loss(values, old_values, returns, op_mask, clip=clip, loss_agg=loss_agg,
                                num_tokens=num_tokens)
    if factor is not None:
        loss = loss * factor
    return loss.to(torch.promote_types(values.dtype, returns.dtype))


@torch.no_grad()
def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
    """OpenRLHF's GAE: values and rewards are zeroed outside ``action_mask`` and the recurrence
    runs over every step (a masked step is a step of reward 0 and value 0): (advantages,
    returns), [B, T]."""
    name = "RemoteExperienceMaker.get_advantages_and_returns"
    args = (self, values, rewards, action_mask, gamma, lambd)
    g, l = unit_interval(gamma), unit_interval(lambd)
    if g is None or l is None:
        return _OPENRLHF.fall_through(name, "gamma or lambd not a number in [0, 1]", *args)
    if values.dtype == torch.float64 or rewards.dtype == torch.float64:
        return _OPENRLHF.fall_through(name, FLOAT64, *args)
    if action_mask is not None:
        values, rewards = action_mask * values, action_mask * rewards
    every = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    advantages, _ = rk.gae(rewards, values, every, gamma=g, lam=l)
    advantages = advantages.to(torch.promote_types(rewards.dtype, values.dtype))
    return advantages, advantages + values


@torch.no_grad()
def get_cumulative_returns(self, rewards, action_mask, gamma):
    """OpenRLHF's REINFORCE returns: the discounted sum of the rewards zeroed outside
    ``action_mask``, over every step: [B, T]."""
    name = "RemoteExperienceMaker.get_cumulative_returns"
    args = (self, rewards, action_mask, gamma)
    g = unit_interval(gamma)
    if g is None:
        return _OPENRLHF.fall_through(name, "gamma not a number in [0, 1]", *args)
    if rewards.dtype == torch.float64:
        return _OPENRLHF.fall_through(name, FLOAT64, *args)
    if action_mask is not None:
        rewards = action_mask * rewards
    every = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    returns, _ = rk.gae(rewards, torch.zeros_like(rewards), every, gamma=g, lam=1.0)
    return returns.to(rewards.dtype)


_OPENRLHF = Integration("openrlhf", "openrlhf>=0.11.2,<0.12", TESTED_VERSION, [
    Replacement(UTILS + "log_probs_from_logits", log_probs_from_logits, "(logits, labels, temperature=1.0)"),
    Replacement(UTILS + "compute_entropy", compute_entropy, "(logits)"),
    Replacement(UTILS + "compute_approx_kl", compute_approx_kl,
                "(log_probs, log_probs_base, log_probs_old=None, kl_estimator='k1', unbiased_gradient=False)"),
    Replacement(LOSS + "PolicyLoss.forward", policy_loss_forward,
                "(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1, "
                "batch_num_tokens=None, global_batch_size=None)"),
    Replacement(LOSS + "ValueLoss.forward", value_loss_forward,
                "(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None, "
                "global_batch_size=None)"),
    Replacement(MAKER + "get_advantages_and_returns", get_advantages_and_returns,
                "(self, values, rewards, action_mask, gamma, lambd)"),
    Replacement(MAKER + "get_cumulative_returns", get_cumulative_returns, "(self, rewards, action_mask, gamma)"),
])


def patch():
    """Swap OpenRLHF's functions and methods above for ours; returns a handle that, used as a
    context manager, unpatches on exit. Raises ImportError if OpenRLHF is not installed,
    UnsupportedVersion if its signatures differ from the supported ones. Functions whose module
    does not import here (e.g. the experience maker without Ray) are left out and logged.
    A second patch() is a no-op (a logged warning)."""
    return _OPENRLHF.patch()


def unpatch():
    """Restore OpenRLHF's own functions. Returns False (and logs) if it was not patched."""
    return _OPENRLHF.unpatch()


def is_patched():
    return _OPENRLHF.is_patched()
