"""Drop-in replacements for verl's hot functions, and ``patch()`` to swap them in.

    import rlhf_kernels.integrations.verl as rk_verl
    rk_verl.patch()      # before building the trainer; or `with rk_verl.patch(): ...`

Supported: verl whose functions have the signatures below (checked by ``patch()``; tested with
verl 0.9.1). Each replacement has the signature, semantics and return convention of verl's
function and runs on our ops. ``patch()`` also swaps the entries of verl's registries
(POLICY_LOSS_REGISTRY["vanilla"], ADV_ESTIMATOR_REGISTRY[...]), which is where
``get_policy_loss_fn`` and ``get_adv_estimator_fn`` look them up.

verl.utils.torch_functional:
| verl | ours | differences |
|---|---|---|
| logprobs_from_logits(logits, labels, inplace_backward=True) | rk.token_logprobs | as verl on this machine: with flash-attn's cross entropy (and VERL_DISABLE_FLASH_ATTN_CE unset) label -100 gives 0, float32 out and the backward may overwrite the logits (inplace_backward); without it, the logits' dtype out and a negative label raises |
| entropy_from_logits(logits) | rk.token_entropy | float32 statistics, the logits' dtype out |
| entropy_from_logits_with_chunking(logits, chunk_size=2048) | rk.token_entropy | chunk_size has no effect |

verl.utils.experimental.torch_functional:
| verl | ours | differences |
|---|---|---|
| FusedLinearForPPO.forward(hidden_states, vocab_weights, input_ids, temperature=1.0): the fused LM head of use_fused_kernels with the "torch" backend (patched on the class) | rk.linear_token_logprobs(return_entropy=True) | logits accumulated in float32 from the matmul (verl rounds them to the hidden states' dtype, then divides by the temperature in that dtype); the "liger" backend falls through |

verl.utils.megatron.tensor_parallel (verl's Megatron backend; its module imports megatron-core, and
is skipped by ``patch()`` where that does not import). The logits are this rank's vocabulary slice
[..., V / tp] and the group is megatron's tensor-parallel group
(``parallel_state.get_tensor_model_parallel_group()``); ours make one all-gather of O(N) float32
per forward and none in the backward (verl's: 3 all-reduces each), and never write over the logits:
| verl | ours | differences |
|---|---|---|
| vocab_parallel_log_probs_from_logits(logits, labels) (megatron's vocab_parallel_cross_entropy, negated; vocab_parallel_log_probs_from_logits_response_rmpad calls it) | rk.token_logprobs(process_group=) | float32 out as megatron's; a label outside [0, V) raises a ValueError (megatron gives its row -(log sum exp(z - max)) instead); megatron writes over float32 logits in its forward |
| vocab_parallel_entropy(vocab_parallel_logits) | rk.token_entropy(process_group=) | float32 statistics, the logits' dtype out; verl's backward writes over the logits and back, which leaves them off by rounding |
| vocab_parallel_entropy_with_chunking(vocab_parallel_logits, chunk_size=2048) | rk.token_entropy(process_group=) | chunk_size has no effect; float32 out as verl's |

verl.trainer.ppo.core_algos:
| verl | ours | differences |
|---|---|---|
| kl_penalty(logprob, ref_logprob, kl_penalty), kl_penalty_forward(...) | rk.kl_penalty | k3 via expm1 (verl's exp(x) - x - 1 cancels near 0) |
| compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam) | rk.gae | one call instead of a T-step loop, float64 carries; whitening statistics in float64 |
| compute_grpo_outcome_advantage / compute_grpo_vectorized_outcome_advantage (grpo, and Dr. GRPO with norm_adv_by_std_in_grpo=False) | rk.group_advantages | float64 group statistics (the vectorized one computes the variance as sum2 - sum^2/n in float32) |
| compute_rloo_outcome_advantage / compute_rloo_vectorized_outcome_advantage | rk.group_advantages(mode="rloo") | each keeps its own convention for a group of one (the loop version: the reward; the vectorized one: 0) |
| compute_reinforce_plus_plus_baseline_outcome_advantage | rk.group_advantages(mode="dr_grpo") + rk.masked_whiten | |
| compute_reinforce_plus_plus_outcome_advantage | rk.gae(values=0, lam=1) + rk.masked_whiten | |
| compute_policy_loss_vanilla (policy_loss.loss_mode="vanilla"), every agg_loss mode | rk.ppo_policy_loss | one fused call; the metrics read back with one host sync instead of three |
| compute_policy_loss_gspo (loss_mode="gspo"), every agg_loss mode | rk.ppo_policy_loss(ratio_level="sequence") | verl gives each token the sequence ratio's gradient as its own, ours spreads it over the sequence: equal for advantages constant within each sequence (verl's outcome estimators), else verl's runs (checked in the metrics' host sync) |
| compute_policy_loss_cispo (loss_mode="cispo"), every agg_loss mode | rk.ppo_policy_loss(objective="cispo") | |
| compute_value_loss, every agg_loss mode | rk.ppo_value_loss | |

Groups (``index``): verl's uid arrays (numpy, any hashable values, or an integer tensor) become
integer ids with numpy.unique on the host, where verl's loops read them too.

Where verl divides by a count that is zero (a micro-batch with no response token and no
global token count), verl's loss is NaN and ours is 0 with zero gradient.

Not replaced, and why (the call goes to verl's function, with a one-time FallThroughWarning
for an option we do not implement; without a warning where verl itself raises):
- float64 inputs (our ops output float32);
- the policy losses with rollout_is_weights: verl computes those weights elsewhere
  (rollout_corr_helper) and passes them in; our op's is_correction computes its own from the
  rollout log-probabilities, which the loss functions do not receive;
- compute_policy_loss_gspo with advantages that vary within a sequence, or a sequence's mean
  log ratio above 10 (verl clamps it there, with no gradient);
- masks with values other than 0 and 1 (verl weights tokens by the mask; checking costs a host
  sync on a GPU for non-bool masks, folded into a read verl makes anyway where it makes one);
- the "triton" fused-kernel backend, verl.utils.kernel.linear_cross_entropy: a GPU-only Triton
  kernel whose equality with ours has not been tested (it needs a GPU);
- verl_F.masked_whiten itself: it writes whitened values at the masked-out positions too, and
  our op writes 0 there (its callers above that multiply by the mask use our op);
- agg_loss alone (it aggregates an arbitrary loss matrix; our ops fuse aggregation into the loss);
- the other policy losses (sapo, gpg, clip_cov, kl_cov, geo_mean, dro, dppo_tv, dppo_kl,
  bypass_mode, reinforce) and advantage estimators (opo, remax, gpg, grpo_passk, gdpo,
  optimal_token_baseline, tir_optimal_token_baseline): different objectives than our ops compute;
- vocab_parallel_sum_pi_squared (verl.utils.megatron.tensor_parallel): sum of squared
  probabilities, which no op of ours computes;
- the deprecated compute_policy_loss, and the logprobs_from_logits_* variants that only
  logprobs_from_logits calls.
"""

import math
import os

import numpy as np
import torch

import rlhf_kernels as rk
from rlhf_kernels.integrations._common import (FallThroughWarning, Integration, Replacement, UnsupportedVersion,
                                               as_bool_mask, clamp_log_ratio, kernel_dtype, never_label,
                                               rows_with_tokens, unit_interval)

__all__ = ["patch", "unpatch", "is_patched", "logprobs_from_logits", "entropy_from_logits",
           "entropy_from_logits_with_chunking", "fused_linear_for_ppo_forward", "vocab_parallel_log_probs_from_logits",
           "vocab_parallel_entropy", "vocab_parallel_entropy_with_chunking", "kl_penalty", "kl_penalty_forward",
           "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
           "compute_grpo_vectorized_outcome_advantage", "compute_rloo_outcome_advantage",
           "compute_rloo_vectorized_outcome_advantage", "compute_reinforce_plus_plus_baseline_outcome_advantage",
           "compute_reinforce_plus_plus_outcome_advantage", "compute_policy_loss_vanilla", "compute_policy_loss_gspo",
           "compute_policy_loss_cispo", "compute_value_loss", "UnsupportedVersion", "FallThroughWarning"]

TESTED_VERSION = "0.9.1"
TF = "verl.utils.torch_functional:"
CA = "verl.trainer.ppo.core_algos:"
TFX = "verl.utils.experimental.torch_functional:"
TPM = "verl.utils.megatron.tensor_parallel:"
FLOAT64 = "float64 inputs (our ops output float32)"
WEIGHTED_MASK = "a mask with values other than 0 and 1 (verl weights tokens by them)"


# ---- logprobs and entropy ------------------------------------------------------------------

def _flash_cross_entropy():
    """Whether verl's logprobs_from_logits takes flash-attn's cross entropy here, and whether it
    takes the Ascend NPU one."""
    try:
        import verl.utils.torch_functional as vf
    except ImportError:
        return False, False
    flash = bool(getattr(vf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)) and \
        os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
    return flash, bool(getattr(vf, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", False))


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's logprobs_from_logits: log softmax(logits) at ``labels``; logits [..., V], labels [...]."""
    flash, npu = _flash_cross_entropy()
    if not flash and npu:
        return _VERL.fall_through("logprobs_from_logits", "the Ascend NPU path", logits, labels, inplace_backward)
    if not kernel_dtype(logits):
        return _VERL.fall_through("logprobs_from_logits", FLOAT64, logits, labels, inplace_backward)
    if flash:  # flash-attn's cross entropy: ignore_index -100, float32 out, optional in-place backward
        return rk.token_logprobs(logits, labels, ignore_index=-100, inplace_backward=bool(inplace_backward))
    return rk.token_logprobs(logits, labels, ignore_index=never_label(labels)).to(logits.dtype)


def entropy_from_logits(logits):
    """verl's entropy_from_logits: entropy of softmax(logits) per position, [..., V] -> [...]."""
    if not kernel_dtype(logits):
        return _VERL.fall_through("entropy_from_logits", FLOAT64, logits)
    return rk.token_entropy(logits).to(logits.dtype)


def entropy_from_logits_with_chunking(logits, chunk_size=2048):
    """verl's entropy_from_logits_with_chunking: logits [N, V] -> entropy [N] float32."""
    if logits.dim() != 2:  # verl's own raises
        return _VERL.call_original("entropy_from_logits_with_chunking", logits, chunk_size)
    if not kernel_dtype(logits):
        return _VERL.fall_through("entropy_from_logits_with_chunking", FLOAT64, logits, chunk_size)
    return rk.token_entropy(logits)


def _tensor_parallel_group():
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_log_probs_from_logits(logits, labels):
    """verl's vocab_parallel_log_probs_from_logits: log softmax at ``labels`` (global ids) over
    the whole vocabulary, from this rank's slice ``logits`` [..., V / tp]; float32 [...]."""
    if not kernel_dtype(logits):
        return _VERL.fall_through("vocab_parallel_log_probs_from_logits", FLOAT64, logits, labels)
    return rk.token_logprobs(logits, labels, ignore_index=never_label(labels), process_group=_tensor_parallel_group())


def vocab_parallel_entropy(vocab_parallel_logits):
    """verl's vocab_parallel_entropy: the full-vocabulary entropy from this rank's slice
    [..., V / tp] -> [...], the logits' dtype."""
    logits = vocab_parallel_logits
    if not kernel_dtype(logits):
        return _VERL.fall_through("vocab_parallel_entropy", FLOAT64, logits)
    return rk.token_entropy(logits, process_group=_tensor_parallel_group()).to(logits.dtype)


def vocab_parallel_entropy_with_chunking(vocab_parallel_logits, chunk_size=2048):
    """verl's vocab_parallel_entropy_with_chunking: [B, T, V / tp] -> entropy [B, T] float32."""
    logits = vocab_parallel_logits
    if logits.dim() != 3:  # verl's own slices the second of three dimensions (and raises otherwise)
        return _VERL.call_original("vocab_parallel_entropy_with_chunking", logits, chunk_size)
    if not kernel_dtype(logits):
        return _VERL.fall_through("vocab_parallel_entropy_with_chunking", FLOAT64, logits, chunk_size)
    return rk.token_entropy(logits, process_group=_tensor_parallel_group())


def fused_linear_for_ppo_forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
    """verl's FusedLinearForPPO.forward (the fused LM head of use_fused_kernels with the "torch"
    backend): (log-probabilities float32, entropies in the logits' dtype) of softmax((hidden @
    W.T) / temperature) at ``input_ids``; hidden [N, H] or [B, T, H], W [V, H]."""
    name = "FusedLinearForPPO.forward"
    args = (self, hidden_states, vocab_weights, input_ids, temperature)
    module = _VERL.original(TFX + "FusedLinearForPPO.forward").__globals__
    if getattr(self, "impl_backend", "torch") != "torch" and \
            module.get("_LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY") is not None:
        return _VERL.fall_through(name, "impl_backend=%r (Liger-Kernel's fused head)" % self.impl_backend, *args)
    device = hidden_states.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden_states.dtype
    if hidden_states.dim() not in (2, 3) or input_ids.shape != hidden_states.shape[:-1] or \
            (dtype == hidden_states.dtype and vocab_weights.dtype != dtype):  # verl raises
        return _VERL.call_original(name, *args)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return _VERL.fall_through(name, "a compute dtype of %s" % dtype, *args)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        return _VERL.fall_through(name, "temperature not a positive number", *args)
    labels = input_ids.to(torch.int64)
    ignore = -100 if module.get("_FLASH_ATTN_CROSS_ENTROPY_AVAILABLE") else never_label(labels)
    with torch.autocast(device.type, enabled=False):
        logp, entropy = rk.linear_token_logprobs(hidden_states.to(dtype).reshape(-1, hidden_states.shape[-1]),
                                                 vocab_weights.to(dtype), labels.reshape(-1),
                                                 temperature=float(temperature), ignore_index=ignore,
                                                 return_entropy=True)
    return logp.view(input_ids.shape), entropy.to(dtype).view(input_ids.shape)


# ---- KL ------------------------------------------------------------------------------------

_KL_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    """verl's kl_penalty_forward: the per-token estimator named ``kl_penalty`` (kl|k1, abs,
    mse|k2, low_var_kl|k3 clamped to [-10, 10])."""
    kind = _KL_KINDS.get(kl_penalty)
    if kind is None:  # "full" and unknown names: verl raises
        return _VERL.call_original("kl_penalty_forward", logprob, ref_logprob, kl_penalty)
    if not (kernel_dtype(logprob) and kernel_dtype(ref_logprob)):
        return _VERL.fall_through("kl_penalty_forward", FLOAT64, logprob, ref_logprob, kl_penalty)
    out = rk.kl_penalty(logprob, ref_logprob, kind, clamp=10.0 if kind == "k3" else None)
    return out.to(torch.promote_types(logprob.dtype, ref_logprob.dtype))


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's kl_penalty: kl_penalty_forward, and with a "+" suffix (k3+, ...) that value with
    the gradient of k2 (straight through)."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if _KL_KINDS.get(base) is None:
        return _VERL.call_original("kl_penalty", logprob, ref_logprob, kl_penalty)
    if not (kernel_dtype(logprob) and kernel_dtype(ref_logprob)):
        return _VERL.fall_through("kl_penalty", FLOAT64, logprob, ref_logprob, kl_penalty)
    value = kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+"):
        return value
    surrogate = rk.kl_penalty(logprob, ref_logprob, "k2").to(value.dtype)
    return surrogate - surrogate.detach() + value.detach()


# ---- advantages ----------------------------------------------------------------------------

def _count_and_exact(mask, exact):
    """(number of true entries, whether the mask was 0/1) read in one host sync."""
    flag = torch.ones((), device=mask.device) if exact is None else exact.float()
    count, ok = torch.stack([mask.sum(dtype=torch.float32), flag]).tolist()
    return int(count), bool(ok)


def _carry_back(adv, mask):
    """verl's GAE loop leaves at a masked step the advantage of the next unmasked step (0 after
    the last one): adv [B, T] (0 at masked steps) -> that, at every step."""
    T = mask.shape[-1]
    steps = torch.arange(T, device=mask.device)
    nxt = torch.where(mask, steps, T).flip(-1).cummin(-1).values.flip(-1)
    padded = torch.cat([adv, adv.new_zeros(adv.shape[0], 1)], dim=-1)
    return padded.gather(-1, nxt)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE: (advantages whitened over the response tokens, returns), both [B, T].

    At masked steps, as verl: the advantage carried back from the next response token (0 after
    the last) and whitened with the same statistics; returns = that + values.
    """
    args = (token_level_rewards, values, response_mask, gamma, lam)
    g, l = unit_interval(gamma), unit_interval(lam)
    if g is None or l is None:
        return _VERL.fall_through("compute_gae_advantage_return", "gamma or lam not a number in [0, 1]", *args)
    if token_level_rewards.dtype == torch.float64 or values.dtype == torch.float64:
        return _VERL.fall_through("compute_gae_advantage_return", FLOAT64, *args)
    if response_mask.dtype == torch.bool:  # verl's loop computes 1 - mask, which raises for bool
        return _VERL.call_original("compute_gae_advantage_return", *args)
    mask, exact = as_bool_mask(response_mask)
    count, ok = _count_and_exact(mask, exact)
    if not ok:
        return _VERL.fall_through("compute_gae_advantage_return", WEIGHTED_MASK, *args)
    if count < 2:  # verl's masked_whiten raises
        return _VERL.call_original("compute_gae_advantage_return", *args)
    with torch.no_grad():
        dtype = torch.promote_types(token_level_rewards.dtype, values.dtype)
        adv, _ = rk.gae(token_level_rewards, values, mask, gamma=g, lam=l)
        full = _carry_back(adv, mask)
        returns = full.to(dtype) + values
        a = adv.double()  # 0 at masked steps
        mean = a.sum() / count
        var = (torch.where(mask, a - mean, 0.0) ** 2).sum() / (count - 1)
        advantages = ((full.double() - mean) * torch.rsqrt(var + 1e-8)).to(dtype)
    return advantages, returns


def _groups(index, n, device):
    """(group ids [n] int64 on ``device``, True where the sequence is alone in its group [n]
    on ``device``, whether any is) from verl's index, or None if it cannot be grouped here."""
    arr = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    if arr.shape != (n,):
        return None
    try:
        _, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
    except TypeError:  # values numpy cannot sort
        return None
    alone = counts[inverse.reshape(-1)] == 1
    return (torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(device),
            torch.from_numpy(alone).to(device), bool(alone.any()))


def _outcome(name, call, token_level_rewards, index, mode, eps=None, alone=None):
    """Scores (row sums) -> (our group advantages [B] in the scores' dtype, with verl's value
    ``alone(scores)`` for sequences alone in their group, None); or (None, the result of verl's
    function called with ``call`` = (args, kwargs))."""
    scores = token_level_rewards.sum(dim=-1)
    if scores.dtype == torch.float64:
        return None, _VERL.fall_through(name, FLOAT64, *call[0], **call[1])
    groups = _groups(index, scores.shape[0], scores.device)
    if groups is None:
        return None, _VERL.fall_through(name, "an index numpy cannot group", *call[0], **call[1])
    ids, single, any_single = groups
    kwargs = {} if eps is None else {"eps": eps}
    adv = rk.group_advantages(scores.detach(), ids, mode=mode, **kwargs).to(scores.dtype)
    if any_single and alone is not None:  # else our 0
        adv = torch.where(single, alone(scores), adv)
    return adv, None


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):
    """verl's GRPO (Dr. GRPO with norm_adv_by_std_in_grpo=False): (adv, adv), [B, T], each
    sequence's (score - group mean) [/ (group std + epsilon)] times response_mask."""
    args = (token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config)
    return _grpo("compute_grpo_outcome_advantage", args)


def compute_grpo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                              norm_adv_by_std_in_grpo=True, config=None):
    """verl's vectorized GRPO: as compute_grpo_outcome_advantage."""
    args = (token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config)
    return _grpo("compute_grpo_vectorized_outcome_advantage", args)


def _grpo(name, args):
    token_level_rewards, response_mask, index, epsilon, norm, _ = args
    if norm and not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and
                     math.isfinite(epsilon) and epsilon >= 0):
        return _VERL.fall_through(name, "epsilon not a finite number >= 0", *args)
    with torch.no_grad():
        if norm:  # a group of one: mean 0 and std 1 in verl
            adv, done = _outcome(name, (args, {}), token_level_rewards, index, "grpo", float(epsilon),
                                 lambda s: s / (1.0 + epsilon))
        else:
            adv, done = _outcome(name, (args, {}), token_level_rewards, index, "dr_grpo", alone=lambda s: s)
        if done is not None:
            return done
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
    """verl's RLOO: each score minus the mean of the other scores of its group (a sequence alone
    in its group keeps its score), times response_mask: (adv, adv)."""
    args = (token_level_rewards, response_mask, index, epsilon, config)
    with torch.no_grad():
        adv, done = _outcome("compute_rloo_outcome_advantage", (args, kwargs), token_level_rewards, index, "rloo",
                             alone=lambda s: s)
        if done is not None:
            return done
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                              **kwargs):
    """verl's vectorized RLOO: as compute_rloo_outcome_advantage, but 0 for a sequence alone."""
    args = (token_level_rewards, response_mask, index, epsilon, config)
    with torch.no_grad():
        adv, done = _outcome("compute_rloo_vectorized_outcome_advantage", (args, kwargs), token_level_rewards, index,
                             "rloo")
        if done is not None:
            return done
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def _whiten_response(name, call, x, response_mask):
    """x [B, T] whitened over the response tokens, 0 elsewhere (verl: masked_whiten(x) * mask);
    or the tuple verl's function returns when called with ``call`` = (args, kwargs)."""
    mask, exact = as_bool_mask(response_mask)
    count, ok = _count_and_exact(mask, exact)
    if not ok:
        return _VERL.fall_through(name, WEIGHTED_MASK, *call[0], **call[1])
    if count < 2:  # verl's masked_whiten raises
        return _VERL.call_original(name, *call[0], **call[1])
    return rk.masked_whiten(x, mask).to(x.dtype)


def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                                           config=None, **kwargs):
    """verl's REINFORCE++-baseline: score minus its group mean, whitened over all response
    tokens of the batch: (adv, adv), [B, T]."""
    name = "compute_reinforce_plus_plus_baseline_outcome_advantage"
    args = (token_level_rewards, response_mask, index, epsilon, config)
    with torch.no_grad():
        x, done = _outcome(name, (args, kwargs), token_level_rewards, index, "dr_grpo", alone=lambda s: s)
        if done is not None:
            return done
        adv = _whiten_response(name, (args, kwargs), x.unsqueeze(-1).expand(response_mask.shape), response_mask)
    return adv if isinstance(adv, tuple) else (adv, adv)


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
    """verl's REINFORCE++: discounted returns over the response tokens (masked steps skipped),
    whitened: (advantages, returns), [B, T]."""
    name = "compute_reinforce_plus_plus_outcome_advantage"
    args = (token_level_rewards, response_mask, config)
    if config is None:  # verl asserts
        return _VERL.call_original(name, *args, **kwargs)
    gamma = unit_interval(config.gamma)
    if gamma is None:
        return _VERL.fall_through(name, "gamma not a number in [0, 1]", *args, **kwargs)
    if token_level_rewards.dtype == torch.float64:
        return _VERL.fall_through(name, FLOAT64, *args, **kwargs)
    if response_mask.dtype == torch.bool:  # verl's loop computes 1 - mask, which raises for bool
        return _VERL.call_original(name, *args, **kwargs)
    with torch.no_grad():
        mask = response_mask != 0
        returns, _ = rk.gae(token_level_rewards, torch.zeros_like(token_level_rewards), mask, gamma=gamma, lam=1.0)
        returns = returns.to(token_level_rewards.dtype)
        adv = _whiten_response(name, (args, kwargs), returns, response_mask)
    return adv if isinstance(adv, tuple) else (adv, returns)


# ---- losses --------------------------------------------------------------------------------

def _aggregation(loss_agg_mode, mask, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None):
    """verl's agg_loss as our ``loss_agg``, ``num_tokens`` and a factor: verl's loss = ours * factor
    (None for 1). None where verl raises or divides by a number <= 0."""
    def per(total, scale=1.0):
        if isinstance(total, torch.Tensor):
            return total.to(mask.device).double() * scale / dp_size
        return total * scale / dp_size if total > 0 else None

    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            return None if dp_size > 1 else ("token-mean", None, None)
        nt = per(batch_num_tokens)
        return None if nt is None else ("token-mean", nt, None)
    if loss_agg_mode == "token-sum":  # sum * dp_size
        return ("token-mean", 1.0 / dp_size, None)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        norm = 1.0
        if loss_agg_mode == "seq-mean-token-sum-norm":
            norm = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
            if not isinstance(norm, torch.Tensor) and norm <= 0:
                return None
        if global_batch_size is None:
            return None if dp_size > 1 else ("seq-mean-token-sum", None, None if norm == 1.0 else 1.0 / norm)
        nt = per(global_batch_size, norm)
        return None if nt is None else ("token-mean", nt, None)
    if loss_agg_mode == "seq-mean-token-mean":
        if global_batch_size is None:
            return None if dp_size > 1 else ("seq-mean-token-mean", None, None)
        if not isinstance(global_batch_size, torch.Tensor) and global_batch_size <= 0:
            return None
        return ("seq-mean-token-mean", None, rows_with_tokens(mask) * dp_size / global_batch_size)
    return None


def _op_mask(response_mask, mask):
    """The mask our ops take: bool or integer as it is, a float one as bool."""
    return mask if response_mask.is_floating_point() else response_mask


def _policy_loss(name, args, op_logprobs, metrics, **options):
    """A verl policy loss on rk.ppo_policy_loss: (loss, the three actor/ metrics as floats), or
    verl's result where we do not implement the call. ``op_logprobs(log_prob, old_log_prob)`` is
    what our op gets as logprobs; ``metrics(stats, mask, old_log_prob, log_prob, advantages)``
    gives 0-d tensors (pg_clipfrac, the sum of ppo_kl over the response tokens, pg_clipfrac_lower,
    a bool: the call is one we implement, else verl's function runs, warning ``metrics.why``),
    all read back in the one host sync verl makes for its metrics."""
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights = args
    if config is None or type(config).__name__ == "AlgoConfig":  # verl asserts
        return _VERL.call_original(name, *args)
    if rollout_is_weights is not None:
        return _VERL.fall_through(name, "rollout_is_weights", *args)
    if not all(kernel_dtype(t) for t in (old_log_prob, log_prob, advantages)):
        return _VERL.fall_through(name, FLOAT64, *args)
    clip = config.clip_ratio
    clip_low = clip if config.clip_ratio_low is None else config.clip_ratio_low
    clip_high = clip if config.clip_ratio_high is None else config.clip_ratio_high
    mask, exact = as_bool_mask(response_mask)
    agg = _aggregation(loss_agg_mode, mask, **config.global_batch_info)
    dual_clip = options.get("dual_clip")
    if agg is None or (dual_clip is not None and not dual_clip > 1.0):  # verl raises (or divides by <= 0)
        return _VERL.call_original(name, *args)
    loss_agg, num_tokens, factor = agg
    loss, stats = rk.ppo_policy_loss(op_logprobs(log_prob, old_log_prob), old_log_prob, advantages,
                                     _op_mask(response_mask, mask), clip_low=clip_low, clip_high=clip_high,
                                     loss_agg=loss_agg, num_tokens=num_tokens, **options)
    if factor is not None:
        loss = loss * factor
    with torch.no_grad():
        count = mask.sum(dtype=torch.float32)
        clipfrac, kl_sum, clipfrac_lower, ours = metrics(stats, mask, old_log_prob, log_prob, advantages)
        flag = ours.float() if exact is None else (exact & ours).float()
        clipfrac, ppo_kl, clipfrac_lower, ok = torch.stack(
            [clipfrac, kl_sum / (count + 1e-8), clipfrac_lower, flag]).tolist()
    if not ok:
        return _VERL.fall_through(name, metrics.why, *args)
    loss = loss.to(torch.promote_types(log_prob.dtype, advantages.dtype))
    return loss, {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": clipfrac_lower}


def _neg_kl_sum(mask, old_log_prob, log_prob, bound=None):
    d = old_log_prob - log_prob
    return torch.where(mask, d if bound is None else d.clamp(-bound, bound), 0.0).sum(dtype=torch.float32)


def _vanilla_metrics(stats, mask, old_log_prob, log_prob, advantages):
    return (stats["clipfrac"], _neg_kl_sum(mask, old_log_prob, log_prob, 20.0), stats["dual_clipfrac"],
            torch.ones((), dtype=torch.bool, device=mask.device))


_vanilla_metrics.why = WEIGHTED_MASK


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's vanilla PPO policy loss (asymmetric and dual clip, the log ratio clamped to +-20):
    (loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} as floats)."""
    args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    clip_c = None if config is None or type(config).__name__ == "AlgoConfig" else config.get("clip_ratio_c", 3.0)
    return _policy_loss("compute_policy_loss_vanilla", args, clamp_log_ratio, _vanilla_metrics, dual_clip=clip_c)


def _gspo_metrics(stats, mask, old_log_prob, log_prob, advantages):
    """verl's GSPO gives each token the gradient of the sequence ratio as if it were the token's
    own (sg(s) * exp(logp - sg(logp))); ours spreads ds/dlogp_t = s / n over the row's tokens.
    The two agree when each row's advantage is one number over its response tokens (outcome
    advantages) and verl's clamp of the log ratio at 10 is not reached: checked here."""
    adv = advantages.float()
    hi = torch.where(mask, adv, -float("inf")).amax(-1)
    lo = torch.where(mask, adv, float("inf")).amin(-1)
    n = mask.sum(-1, dtype=torch.float32)
    seq = torch.where(mask, (log_prob - old_log_prob).float(), 0.0).sum(-1) / n.clamp(min=1)
    ours = ((hi == lo) | (n == 0)).all() & (seq <= 10.0).all()
    return stats["clipfrac"], _neg_kl_sum(mask, old_log_prob, log_prob), torch.zeros((), device=mask.device), ours


_gspo_metrics.why = ("advantages that vary within a sequence, a sequence log ratio above verl's clamp at 10, or %s"
                     % WEIGHTED_MASK)


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's GSPO loss (policy_loss.loss_mode="gspo"): the clipped objective on each sequence's
    ratio exp(mean of its log ratios): (loss, the three actor/ metrics as floats)."""
    args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    return _policy_loss("compute_policy_loss_gspo", args, lambda lp, old: lp, _gspo_metrics, ratio_level="sequence")


def _cispo_metrics(stats, mask, old_log_prob, log_prob, advantages):
    return (stats["clipfrac"], _neg_kl_sum(mask, old_log_prob, log_prob, 20.0), torch.zeros((), device=mask.device),
            torch.ones((), dtype=torch.bool, device=mask.device))


_cispo_metrics.why = WEIGHTED_MASK


def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
    """verl's CISPO loss (policy_loss.loss_mode="cispo"): -sg(clip(ratio)) * A * logp per token,
    aggregated: (loss, the three actor/ metrics as floats). The ratio's clamp at +-20 in verl
    changes nothing the clip does not."""
    args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    return _policy_loss("compute_policy_loss_cispo", args, lambda lp, old: lp, _cispo_metrics, objective="cispo")


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                       dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's clipped value loss: (0.5 * agg(max((V - R)^2, (clip(V, V_old +- c) - R)^2)),
    vf_clipfrac as a 0-d tensor)."""
    name = "compute_value_loss"
    args = (vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode, dp_size, batch_num_tokens,
            global_batch_size, loss_scale_factor)
    if isinstance(cliprange_value, bool) or not isinstance(cliprange_value, (int, float)):
        return _VERL.call_original(name, *args)
    if not cliprange_value > 0:
        return _VERL.fall_through(name, "cliprange_value <= 0", *args)
    if not all(kernel_dtype(t) for t in (vpreds, returns, values)):
        return _VERL.fall_through(name, FLOAT64, *args)
    mask, exact = as_bool_mask(response_mask)
    agg = _aggregation(loss_agg_mode, mask, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
    if agg is None:
        return _VERL.call_original(name, *args)
    if exact is not None and not bool(exact):
        return _VERL.fall_through(name, WEIGHTED_MASK, *args)
    loss_agg, num_tokens, factor = agg
    loss, stats = rk.ppo_value_loss(vpreds, values, returns, _op_mask(response_mask, mask), clip=float(cliprange_value),
                                    loss_agg=loss_agg, num_tokens=num_tokens)
    if factor is not None:
        loss = loss * factor
    return loss.to(torch.promote_types(vpreds.dtype, returns.dtype)), stats["vf_clipfrac"]


_VERL = Integration("verl", "verl>=0.9.1,<0.10", TESTED_VERSION, [
    Replacement(TF + "logprobs_from_logits", logprobs_from_logits, "(logits, labels, inplace_backward=True)"),
    Replacement(TF + "entropy_from_logits", entropy_from_logits, "(logits)"),
    Replacement(TF + "entropy_from_logits_with_chunking", entropy_from_logits_with_chunking,
                "(logits, chunk_size=2048)"),
    Replacement(TFX + "FusedLinearForPPO.forward", fused_linear_for_ppo_forward,
                "(self, hidden_states, vocab_weights, input_ids, temperature=1.0)"),
    Replacement(TPM + "vocab_parallel_log_probs_from_logits", vocab_parallel_log_probs_from_logits, "(logits, labels)"),
    Replacement(TPM + "vocab_parallel_entropy", vocab_parallel_entropy, "(vocab_parallel_logits)"),
    Replacement(TPM + "vocab_parallel_entropy_with_chunking", vocab_parallel_entropy_with_chunking,
                "(vocab_parallel_logits, chunk_size=2048)"),
    Replacement(CA + "kl_penalty", kl_penalty, "(logprob, ref_logprob, kl_penalty)"),
    Replacement(CA + "kl_penalty_forward", kl_penalty_forward, "(logprob, ref_logprob, kl_penalty)"),
    Replacement(CA + "compute_gae_advantage_return", compute_gae_advantage_return,
                "(token_level_rewards, values, response_mask, gamma, lam)"),
    Replacement(CA + "compute_grpo_outcome_advantage", compute_grpo_outcome_advantage,
                "(token_level_rewards, response_mask, index, epsilon=1e-06, norm_adv_by_std_in_grpo=True, "
                "config=None)"),
    Replacement(CA + "compute_grpo_vectorized_outcome_advantage", compute_grpo_vectorized_outcome_advantage,
                "(token_level_rewards, response_mask, index, epsilon=1e-06, norm_adv_by_std_in_grpo=True, "
                "config=None)"),
    Replacement(CA + "compute_rloo_outcome_advantage", compute_rloo_outcome_advantage,
                "(token_level_rewards, response_mask, index, epsilon=1e-06, config=None, **kwargs)"),
    Replacement(CA + "compute_rloo_vectorized_outcome_advantage", compute_rloo_vectorized_outcome_advantage,
                "(token_level_rewards, response_mask, index, epsilon=1e-06, config=None, **kwargs)"),
    Replacement(CA + "compute_reinforce_plus_plus_baseline_outcome_advantage",
                compute_reinforce_plus_plus_baseline_outcome_advantage,
                "(token_level_rewards, response_mask, index, epsilon=1e-06, config=None, **kwargs)"),
    Replacement(CA + "compute_reinforce_plus_plus_outcome_advantage", compute_reinforce_plus_plus_outcome_advantage,
                "(token_level_rewards, response_mask, config=None, **kwargs)"),
    Replacement(CA + "compute_policy_loss_vanilla", compute_policy_loss_vanilla,
                "(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode='token-mean', config=None, "
                "rollout_is_weights=None)"),
    Replacement(CA + "compute_policy_loss_gspo", compute_policy_loss_gspo,
                "(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode='seq-mean-token-mean', "
                "config=None, rollout_is_weights=None)"),
    Replacement(CA + "compute_policy_loss_cispo", compute_policy_loss_cispo,
                "(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode='token-mean', config=None, "
                "rollout_is_weights=None)"),
    Replacement(CA + "compute_value_loss", compute_value_loss,
                "(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode='token-mean', dp_size=1, "
                "batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)"),
])


def patch():
    """Swap verl's functions above for ours wherever verl looks them up (module attributes and its
    registries); returns a handle that, used as a context manager, unpatches on exit. Raises
    ImportError if verl is not installed, UnsupportedVersion if its signatures differ from the
    supported ones. A second patch() is a no-op (a logged warning)."""
    return _VERL.patch()


def unpatch():
    """Restore verl's own functions. Returns False (and logs) if it was not patched."""
    return _VERL.unpatch()


def is_patched():
    return _VERL.is_patched()
