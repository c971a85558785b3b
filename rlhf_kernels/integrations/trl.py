"""Drop-in replacements for TRL's hot functions, and ``patch()`` to swap them in.

    import rlhf_kernels.integrations.trl as rk_trl
    with rk_trl.patch():          # or rk_trl.patch() ... rk_trl.unpatch()
        trainer.train()

Supported: TRL whose functions have the signatures below (checked by ``patch()``; tested with
trl 1.16.0). Each replacement has the signature, semantics and return convention of TRL's
function and runs on our ops:

| TRL (trl.trainer.utils unless named)          | ours                       | differences |
|-----------------------------------------------|----------------------------|-------------|
| selective_log_softmax(logits, index, temperature=1.0, row_mask=None) | rk.token_logprobs | float32 statistics whatever the dtype (TRL's CPU path works in bf16 for bf16 logits); no [N, V] temporaries |
| entropy_from_logits(logits, chunk_size=128)   | rk.token_entropy           | chunk_size is a memory knob TRL needs and we do not |
| selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None) | rk.token_logprobs(return_entropy=True) | one pass for both |
| trl.kernels.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs): the fused LM head of GRPOTrainer (add_fused_lm_head) | rk.linear_token_logprobs | logits accumulated in float32 straight from the matmul (TRL rounds each bf16 tile to bf16 first) |

Return dtypes follow TRL: on a CUDA device float32 (TRL's Triton kernel), elsewhere the
logits' dtype; the fused head returns float32 everywhere.

Not replaced, and why (the call goes to TRL's own function, with a one-time
FallThroughWarning, never a wrong answer):
- float64 logits: our kernels compute in float32;
- selective_log_softmax with an index of shape (..., K) (several labels per position);
- the fused head with final_logit_softcapping, logit_scale != 1, outputs other than
  log_probs/entropy (log_sum_sq_probs, mean_logits, is_top1), or a DeepSpeed ZeRO-3
  partitioned weight (TRL gathers it again in its backward);
- GRPO's advantages and its losses (every loss_type, GSPO's importance_sampling_level, the vLLM
  importance-sampling correction) are written inline in GRPOTrainer._compute_loss (no function
  to swap), and nanstd/nanmin/nanmax are reductions of [B] tensors.
A label outside [0, V) raises a ValueError (TRL's gather raises a RuntimeError).
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels.integrations._common import (FallThroughWarning, Integration, Replacement, UnsupportedVersion,
                                               kernel_dtype, never_label)

__all__ = ["patch", "unpatch", "is_patched", "selective_log_softmax", "entropy_from_logits",
           "selective_log_softmax_and_entropy", "chunked_logprob_apply", "UnsupportedVersion", "FallThroughWarning"]

TESTED_VERSION = "1.16.0"
CHUNKED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's default `outputs`


def _out_dtype(logits):
    return torch.float32 if logits.device.type in ("cuda", "xpu") else logits.dtype


def _labels(index, row_mask):
    """index with the rows TRL skips (row_mask == 0) set to a label we ignore."""
    ignore = never_label(index)
    labels = index if row_mask is None else index.masked_fill(row_mask == 0, ignore)
    return labels, ignore


def _why_not(logits, index=None):
    if not kernel_dtype(logits):
        return "logits of dtype %s (the kernels take float32, bfloat16, float16)" % logits.dtype
    if index is not None and index.dim() != logits.dim() - 1:
        return "an index of shape (..., K) (K labels per position)"
    return None


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
    """TRL's selective_log_softmax: log softmax(logits / temperature) at ``index``; 0 where
    ``row_mask`` is 0. logits [..., V], index [...] -> [...]; differentiable wrt logits."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    why = _why_not(logits, index)
    if why:
        return _TRL.fall_through("selective_log_softmax", why, logits, index, temperature, row_mask)
    labels, ignore = _labels(index, row_mask)
    logp = rk.token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore)
    return logp.to(_out_dtype(logits))


def entropy_from_logits(logits, chunk_size=128):
    """TRL's entropy_from_logits: the entropy of softmax(logits) per position, [..., V] -> [...]."""
    why = _why_not(logits)
    if why:
        return _TRL.fall_through("entropy_from_logits", why, logits, chunk_size)
    return rk.token_entropy(logits).to(_out_dtype(logits))


def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
    """TRL's selective_log_softmax_and_entropy: (log-probabilities at ``index``, entropies), both of
    softmax(logits / temperature), both 0 where ``row_mask`` is 0."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    why = _why_not(logits, index)
    if why:
        return _TRL.fall_through("selective_log_softmax_and_entropy", why, logits, index, entropy_requires_grad,
                                 temperature, row_mask)
    labels, ignore = _labels(index, row_mask)
    logp, entropy = rk.token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore,
                                      return_entropy=True)
    dtype = _out_dtype(logits)
    logp, entropy = logp.to(dtype), entropy.to(dtype)
    return logp, entropy if entropy_requires_grad else entropy.detach()


def chunked_logprob_apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                          logit_scale=1.0, outputs=CHUNKED_OUTPUTS):
    """TRL's ChunkedLogProbFunction.apply: per-token log-probabilities (and entropy) of
    ``hidden @ weight.T + bias`` over temperature, without the [N, V] logits.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> (logprobs [N] float32,
    entropy [N] float32 or None, None, None, None). Under autocast the matmul runs in the
    autocast dtype, as in TRL. ``chunk_size`` (TRL's vocabulary tile) has no effect here.
    """
    why = None
    device = hidden.device
    compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    if final_logit_softcapping is not None:
        why = "final_logit_softcapping"
    elif logit_scale != 1.0:
        why = "logit_scale != 1"
    elif set(outputs) - {"log_probs", "entropy"}:
        why = "outputs %s" % sorted(set(outputs) - {"log_probs", "entropy"})
    elif compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        why = "compute dtype %s" % compute_dtype
    elif hasattr(weight, "ds_id"):
        why = "a DeepSpeed ZeRO-3 partitioned weight"
    if why:
        return _TRL.fall_through("ChunkedLogProbFunction.apply", why, hidden, weight, bias, targets, temperature,
                                 chunk_size, final_logit_softcapping, logit_scale, outputs)
    want_entropy = "entropy" in outputs
    with torch.autocast(device.type, enabled=False):
        out = rk.linear_token_logprobs(hidden.to(compute_dtype), weight.to(compute_dtype), targets,
                                       bias=None if bias is None else bias.to(compute_dtype),
                                       temperature=temperature, return_entropy=want_entropy)
    logp, entropy = out if want_entropy else (out, None)
    return logp, entropy, None, None, None


_TRL = Integration("trl", "trl>=1.16,<1.17", TESTED_VERSION, [
    Replacement("trl.trainer.utils:selective_log_softmax", selective_log_softmax,
                "(logits, index, temperature=1.0, row_mask=None)"),
    Replacement("trl.trainer.utils:entropy_from_logits", entropy_from_logits, "(logits, chunk_size=128)"),
    Replacement("trl.trainer.utils:selective_log_softmax_and_entropy", selective_log_softmax_and_entropy,
                "(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None)"),
    Replacement("trl.kernels.chunked_logprob:ChunkedLogProbFunction.apply", chunked_logprob_apply,
                "(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, "
                "logit_scale=1.0, outputs=('entropy', 'log_sum_sq_probs', 'mean_logits', 'is_top1'))",
                check="trl.kernels.chunked_logprob:ChunkedLogProbFunction.forward", static=True),
])


def patch():
    """Swap TRL's functions above for ours wherever TRL looks them up; returns a handle that,
    used as a context manager, unpatches on exit. Raises ImportError if TRL is not installed,
    UnsupportedVersion if its signatures differ from the supported ones. A second patch() is
    a no-op (a logged warning)."""
    return _TRL.patch()


def unpatch():
    """Restore TRL's own functions. Returns False (and logs) if it was not patched."""
    return _TRL.unpatch()


def is_patched():
    return _TRL.is_patched()
