"""Reward-model losses: Bradley-Terry pairs and the InstructGPT all-pairs ranking loss.

    bt:       d = chosen - rejected - margin
              loss = mean(-(1-eps)*logsigmoid(d) - eps*logsigmoid(-d)) + center_coef*mean((chosen+rejected)^2)
    ranking:  rewards [P, K] ordered best first; per prompt with >= 2 valid responses, the
              mean over valid pairs i < j of -logsigmoid(r_i - r_j); loss = mean over those prompts.
logsigmoid is evaluated stably (min(x, 0) - log1p(exp(-|x|))); no host sync anywhere.
"""

import numbers

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import bt as ref

BT_STATS = ref.BT_STATS
RANKING_STATS = ref.RANKING_STATS


def _number(op, name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError("%s: `%s` must be a number, got %r" % (op, name, value))
    if value < lo or (hi is not None and value > hi):
        raise ValueError("%s: `%s` must be in [%g, %s], got %r" % (op, name, lo, "inf" if hi is None else hi, value))
    return float(value)


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
        (loss, stats): loss 0-d float32 (0 for P = 0); stats ``accuracy`` = mean(chosen > rejected)
        and ``margin_mean`` = mean(chosen - rejected), 0-d float32.
    """
    op = "bt_loss"
    v.tensor(op, "chosen", chosen, ndim=1, kind="float")
    v.tensor(op, "rejected", rejected, kind="float")
    v.same_shape(op, "chosen", chosen, "rejected", rejected)
    if margin is not None:
        v.tensor(op, "margin", margin, kind="float")
        v.same_shape(op, "chosen", chosen, "margin", margin)
    v.same_device(op, "chosen", chosen, rejected=rejected, margin=margin)
    eps = _number(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    cc = _number(op, "center_coef", center_coef, 0.0)
    name = _backend.resolve(backend, chosen.device, op)
    c, r = v.as_f32(chosen), v.as_f32(rejected)
    mg = None if margin is None else v.as_f32(margin).detach()
    if name == "torch":
        loss, stats = ref.bt_loss(c.double(), r.double(), None if mg is None else mg.double(), eps, cc)
        return loss.float(), {k: s.float() for k, s in stats.items()}
    if name == "triton":
        from rlhf_kernels.triton import bt as tri
        loss, stats = tri.BTLoss.apply(c, r, mg, eps, cc)
    else:
        loss, stats = torch.ops.rlhf_kernels.bt_fwd(c, r, mg, eps, cc)
    return loss, dict(zip(BT_STATS, stats.unbind(0)))


def ranking_loss(rewards, *, valid=None, backend="auto"):
    """InstructGPT all-pairs ranking loss.

    Args:
        rewards: [P, K] float, K responses per prompt ordered best first; receives gradients.
        valid: [P, K] bool or 0/1, or None (all valid): ragged K per prompt.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (loss, stats): loss 0-d float32, the mean over prompts with at least two valid
        responses of the mean over their valid pairs i < j of -logsigmoid(r_i - r_j)
        (0 if no prompt has a pair); stats ``accuracy``, the fraction of all valid pairs with
        r_i > r_j.
    """
    op = "ranking_loss"
    v.tensor(op, "rewards", rewards, ndim=2, kind="float")
    if valid is not None:
        v.tensor(op, "valid", valid, kind="mask")
        v.same_shape(op, "rewards", rewards, "valid", valid)
    v.same_device(op, "rewards", rewards, valid=valid)
    name = _backend.resolve(backend, rewards.device, op)
    r = v.as_f32(rewards)
    ok = None if valid is None else v.as_mask(valid)
    if name == "torch":
        loss, stats = ref.ranking_loss(r.double(), ok)
        return loss.float(), {k: s.float() for k, s in stats.items()}
    if name == "triton":
        from rlhf_kernels.triton import bt as tri
        loss, stats = tri.RankingLoss.apply(r, ok)
    else:
        loss, stats, _ = torch.ops.rlhf_kernels.ranking_fwd(r, ok)
    return loss, dict(zip(RANKING_STATS, stats.unbind(0)))


if _ext.loaded():
    @torch.library.register_fake("rlhf_kernels::bt_fwd")
    def _bt_fwd_fake(chosen, rejected, margin, label_smoothing, center_coef):
        return chosen.new_empty(()), chosen.new_empty((len(BT_STATS),))

    @torch.library.register_fake("rlhf_kernels::bt_bwd")
    def _bt_bwd_fake(grad, chosen, rejected, margin, label_smoothing, center_coef):
        return torch.empty_like(chosen), torch.empty_like(rejected)

    @torch.library.register_fake("rlhf_kernels::ranking_fwd")
    def _ranking_fwd_fake(rewards, valid):
        return rewards.new_empty(()), rewards.new_empty((len(RANKING_STATS),)), rewards.new_empty((rewards.shape[0],))

    @torch.library.register_fake("rlhf_kernels::ranking_bwd")
    def _ranking_bwd_fake(grad, rewards, valid, prompt_scale):
        return torch.empty_like(rewards)

    def _bt_setup(ctx, inputs, output):
        chosen, rejected, margin, label_smoothing, center_coef = inputs
        ctx.save_for_backward(chosen, rejected, margin)
        ctx.coefs = (label_smoothing, center_coef)

    def _bt_backward(ctx, grad_loss, grad_stats):
        chosen, rejected, margin = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = chosen.new_zeros(())
        dc, dr = torch.ops.rlhf_kernels.bt_bwd(grad_loss.contiguous(), chosen, rejected, margin, *ctx.coefs)
        return dc, dr, None, None, None

    torch.library.register_autograd("rlhf_kernels::bt_fwd", _bt_backward, setup_context=_bt_setup)

    def _ranking_setup(ctx, inputs, output):
        rewards, valid = inputs
        ctx.save_for_backward(rewards, valid, output[2])

    def _ranking_backward(ctx, grad_loss, grad_stats, grad_scale):
        rewards, valid, prompt_scale = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = rewards.new_zeros(())
        return torch.ops.rlhf_kernels.ranking_bwd(grad_loss.contiguous(), rewards, valid, prompt_scale), None

    torch.library.register_autograd("rlhf_kernels::ranking_fwd", _ranking_backward, setup_context=_ranking_setup)
