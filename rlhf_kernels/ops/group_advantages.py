"""Critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++): each sequence's reward against
the rewards of its group, the sequences sampled for the same prompt (no gradients).

With n, mean and std (unbiased, n - 1, as torch.std) of the group's rewards:
    grpo         (r - mean) / (std + eps)
    dr_grpo      r - mean
    rloo         r - (mean of the group's other n - 1 rewards)
    reinforce++  x = r - mean, then (x - mean(x)) / (std(x) + eps) over the batch
Statistics are float64; the result is bitwise the same on every run and makes no host sync.
"""

import math
import numbers

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._layout import DEFAULT_GROUP_EPS
from rlhf_kernels._signatures import f32, shape
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import group_advantages as ref

NATIVE = _backend.NATIVE
MODES = ("grpo", "dr_grpo", "rloo", "reinforce++")
DEFAULT_EPS = DEFAULT_GROUP_EPS
if _ext.loaded():
    _group_advantages = torch.ops.rlhf_kernels.group_advantages.default
    _group_advantages_masked = torch.ops.rlhf_kernels.group_advantages_masked.default


def group_advantages(rewards, group_index=None, *, group_size=None, mode="grpo", eps=DEFAULT_EPS, mask=None,
                     backend="auto"):
    """Advantages of sequences sampled in groups, one reward per sequence.

    Args:
        rewards: [B] float (any float dtype), one reward per sequence.
        group_index: [B] integer (any integer dtype), each sequence's group id; ids need not
            be sorted, contiguous or small (any int64 values).
        group_size: instead of group_index, groups of ``group_size`` consecutive sequences
            (an int that divides B). Give exactly one of the two.
        mode: "grpo", "dr_grpo", "rloo" or "reinforce++" (formulas in the module docstring).
        eps: added to the std by "grpo" and "reinforce++"; the other modes refuse a value
            other than the default (nothing is silently ignored).
        mask: optional [B, T] bool or integer (nonzero = valid token); float masks are refused.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    A group of one sequence gets advantage 0 in every mode and is left out of reinforce++'s
    batch statistics. A NaN (or infinite) reward makes every advantage of its group NaN and
    leaves the other groups untouched; reinforce++'s batch statistics skip such groups.

    Returns:
        adv [B] float32; with ``mask``, ``(adv, token_adv)`` where token_adv [B, T] float32 is
        adv[b] where mask[b, t] is nonzero and 0 elsewhere.
    """
    op = "group_advantages"
    name = _backend.pick(backend, rewards, op, "rewards")
    if group_size is True or group_size is False:  # the dispatcher would take a bool as an int
        raise TypeError("%s: `group_size` must be an int, got %r" % (op, group_size))
    if name in NATIVE:
        try:
            if mask is None:
                return _group_advantages(rewards, group_index, group_size, mode, eps)
            return _group_advantages_masked(rewards, group_index, group_size, mode, eps, mask)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
    eps = _check(op, rewards, group_index, group_size, mode, eps, mask)
    r = v.as_f32(rewards)
    ids = None if group_index is None else group_index.to(torch.int64).contiguous()
    m = None if mask is None else v.as_mask(mask)
    if name == "torch":
        adv = ref.group_advantages(r.double(), ids, group_size, mode, eps).float()
        return adv if m is None else (adv, ref.masked(adv, m))
    from rlhf_kernels.triton import group_advantages as tri
    if m is None:
        return tri.group_advantages(r, ids, group_size or 0, mode, eps)
    return tri.group_advantages_masked(r, ids, group_size or 0, mode, eps, m)


def _check(op, rewards, group_index, group_size, mode, eps, mask):
    """The checks of rlhf/group_advantages_op.h, in its order, for the torch and triton backends.
    Returns eps as a float."""
    v.tensor(op, "rewards", rewards, ndim=1, kind="float")
    B = rewards.shape[0]
    if (group_index is None) == (group_size is None):
        raise ValueError("%s: give exactly one of `group_index` (a group id per sequence) and `group_size` "
                         "(groups of consecutive sequences), got %s"
                         % (op, "neither" if group_index is None else "both"))
    if group_size is not None:
        if not isinstance(group_size, numbers.Integral):
            raise TypeError("%s: `group_size` must be an int, got %r" % (op, group_size))
        if group_size < 1:
            raise ValueError("%s: `group_size` must be >= 1, got %d" % (op, group_size))
        if B % group_size:
            raise ValueError("%s: `group_size` = %d must divide the number of sequences B = %d"
                             % (op, group_size, B))
    else:
        v.tensor(op, "group_index", group_index, kind="int")
        if group_index.dim() != 1 or group_index.shape[0] != B:
            raise ValueError("%s: `group_index` must have shape [B] = [%d] (one group id per reward), got %s"
                             % (op, B, list(group_index.shape)))
        v.same_device(op, "rewards", rewards, group_index=group_index)
    if not isinstance(mode, str):
        raise TypeError("%s: `mode` must be a string, got %r" % (op, mode))
    if mode not in MODES:
        raise ValueError("%s: unknown `mode` %r; choose one of %s" % (op, mode, ", ".join(map(repr, MODES))))
    eps = v.number(op, "eps", eps, lo=0.0)
    if not math.isfinite(eps):
        raise ValueError("%s: `eps` must be a finite number >= 0, got %r" % (op, eps))
    if eps != DEFAULT_EPS and mode not in ("grpo", "reinforce++"):
        raise ValueError("%s: `eps` = %g is not used by mode %r (only 'grpo' and 'reinforce++' divide by a std); "
                         "leave it at %g" % (op, eps, mode, DEFAULT_EPS))
    if mask is not None:
        v.tensor(op, "mask", mask, kind="mask")
        if mask.dim() != 2 or mask.shape[0] != B:
            raise ValueError("%s: `mask` must have shape [B, T] with B = %d (the number of rewards), got %s"
                             % (op, B, list(mask.shape)))
        v.same_device(op, "rewards", rewards, mask=mask)
    return eps


# ---- output shapes of the native ops and their Triton twins (rlhf_kernels/_signatures.py) ----

@shape("group_advantages")
def _group_advantages_shape(rewards, **_):
    return f32(rewards, rewards.shape)


@shape("group_advantages_masked")
def _group_advantages_masked_shapes(rewards, mask, **_):
    return f32(rewards, rewards.shape), f32(rewards, mask.shape)
