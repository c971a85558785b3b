"""Reward-model losses: Bradley-Terry pairs and the InstructGPT all-pairs ranking loss.

    bt:       d = chosen - rejected - margin
              loss = mean(-(1-eps)*logsigmoid(d) - eps*logsigmoid(-d)) + center_coef*mean((chosen+rejected)^2)
    ranking:  rewards [P, K] ordered best first; per prompt with >= 2 valid responses, the
              mean over valid pairs i < j of -logsigmoid(r_i - r_j); loss = mean over those prompts.
logsigmoid is evaluated stably (min(x, 0) - log1p(exp(-|x|))); no host sync anywhere.
"""

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._layout import BT_STATS, RANKING_STATS
from rlhf_kernels._signatures import f32, shape
from rlhf_kernels._stats import stats as _stats
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import bt as ref

NATIVE = _backend.NATIVE
if _ext.loaded():
    _bt_fwd = torch.ops.rlhf_kernels.bt_fwd.default
    _ranking_fwd = torch.ops.rlhf_kernels.ranking_fwd.default


def bt_loss(chosen, rejected, *, margin=None, label_smoothing=0.0, center_coef=0.0, backend="auto"):
    """Bradley-Terry pairwise loss.

    Args:
        chosen, rejected: [P] float rewards of the preferred and the other response;
            both receive gradients.
        margin: [P] float or None, subtracted from chosen - rejected (constant).
        label_smoothing: eps in [0, 1]: the weight of the flipped label.
        center_coef: >= 0, weight of mean((chosen + rejected)^2) (reward centering).
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (loss, stats): loss 0-d float32 (0 for P = 0); stats, a read-only mapping of 0-d float32
        tensors: ``accuracy`` = mean(chosen > rejected) and ``margin_mean`` = mean(chosen - rejected)
        (``stats.packed``: both in one tensor).
    """
    op = "bt_loss"
    name = _backend.pick(backend, chosen, op, "chosen")
    if name in NATIVE:
        try:
            loss, packed = _bt_fwd(chosen, rejected, margin, label_smoothing, center_coef)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return loss, _stats(BT_STATS, packed)
    v.floats(op, ("chosen", "rejected"), (chosen, rejected), 1, device=False)  # device: with margin, below
    if margin is not None:
        v.tensor(op, "margin", margin, kind="float")
        v.same_shape(op, "chosen", chosen, "margin", margin)
    v.same_device(op, "chosen", chosen, rejected=rejected, margin=margin)
    eps = v.number(op, "label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    cc = v.number(op, "center_coef", center_coef, lo=0.0)
    c, r = v.as_f32(chosen), v.as_f32(rejected)
    mg = None if margin is None else v.as_f32(margin).detach()
    if name == "torch":
        loss, stats = ref.bt_loss(c.double(), r.double(), None if mg is None else mg.double(), eps, cc)
        return loss.float(), _stats(BT_STATS, torch.stack([stats[k] for k in BT_STATS]).float())
    from rlhf_kernels.triton import bt as tri
    loss, packed = tri.bt_forward(c, r, mg, eps, cc)
    return loss, _stats(BT_STATS, packed)


def ranking_loss(rewards, *, valid=None, backend="auto"):
    """InstructGPT all-pairs ranking loss.

    Args:
        rewards: [P, K] float, K responses per prompt ordered best first; receives gradients.
        valid: [P, K] bool or integer (nonzero = valid), or None (all valid): ragged K per prompt.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (loss, stats): loss 0-d float32, the mean over prompts with at least two valid
        responses of the mean over their valid pairs i < j of -logsigmoid(r_i - r_j)
        (0 if no prompt has a pair); stats ``accuracy``, the fraction of all valid pairs with
        r_i > r_j.
    """
    op = "ranking_loss"
    name = _backend.pick(backend, rewards, op, "rewards")
    if name in NATIVE:
        try:
            loss, packed, _ = _ranking_fwd(rewards, valid)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return loss, _stats(RANKING_STATS, packed)
    v.tensor(op, "rewards", rewards, ndim=2, kind="float")
    if valid is not None:
        v.tensor(op, "valid", valid, kind="mask")
        v.same_shape(op, "rewards", rewards, "valid", valid)
    v.same_device(op, "rewards", rewards, valid=valid)
    r = v.as_f32(rewards)
    ok = None if valid is None else v.as_mask(valid)
    if name == "torch":
        loss, stats = ref.ranking_loss(r.double(), ok)
        return loss.float(), _stats(RANKING_STATS, torch.stack([stats[k] for k in RANKING_STATS]).float())
    from rlhf_kernels.triton import bt as tri
    loss, packed, _ = tri.ranking_forward(r, ok)
    return loss, _stats(RANKING_STATS, packed)


# ---- output shapes of the native ops and their Triton twins (rlhf_kernels/_signatures.py) ----

@shape("bt_fwd")
def _bt_shapes(chosen, **_):
    return f32(chosen, ()), f32(chosen, (len(BT_STATS),))


@shape("bt_bwd")
def _bt_grad_shapes(chosen, rejected, **_):
    return f32(chosen, chosen.shape), f32(rejected, rejected.shape)


@shape("ranking_fwd")
def _ranking_shapes(rewards, **_):
    return f32(rewards, ()), f32(rewards, (len(RANKING_STATS),)), f32(rewards, (rewards.shape[0],))


@shape("ranking_bwd")
def _ranking_grad_shape(rewards, **_):
    return f32(rewards, rewards.shape)
