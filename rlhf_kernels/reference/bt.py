"""Reward-model losses: Bradley-Terry pairs and InstructGPT all-pairs ranking."""

import torch
import torch.nn.functional as F

from rlhf_kernels._layout import BT_STATS, RANKING_STATS  # noqa: F401 (re-exported)


def bt_loss(chosen, rejected, margin=None, label_smoothing=0.0, center_coef=0.0):
    """chosen, rejected: [P]; margin: [P] or None. Returns (loss 0-d, stats).

    d = chosen - rejected - margin;
    loss = mean(-(1-eps)*logsigmoid(d) - eps*logsigmoid(-d)) + center_coef*mean((chosen+rejected)^2).
    An empty batch gives loss 0 and stats 0.
    """
    P = chosen.shape[0]
    diff = chosen - rejected
    d = diff if margin is None else diff - margin
    eps = label_smoothing
    per_pair = -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
    loss = per_pair.sum() / max(P, 1)
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).sum() / max(P, 1)
    with torch.no_grad():
        stats = {"accuracy": (chosen > rejected).to(diff.dtype).sum() / max(P, 1),
                 "margin_mean": diff.detach().sum() / max(P, 1)}
    return loss, stats


def ranking_loss(rewards, valid=None):
    """rewards: [P, K], best first; valid: [P, K] bool or None. Returns (loss 0-d, stats).

    Per prompt with at least two valid responses: the mean over valid pairs i < j of
    -logsigmoid(r_i - r_j); the loss is the mean over those prompts (0 if none).
    accuracy = fraction of all valid pairs with r_i > r_j (0 if none).
    """
    P, K = rewards.shape
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    d = rewards[:, :, None] - rewards[:, None, :]                       # [P, K, K]: r_i - r_j
    upper = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu(1)
    pair = valid[:, :, None] & valid[:, None, :] & upper               # valid pairs i < j
    per_pair = torch.where(pair, -F.logsigmoid(d), torch.zeros_like(d))
    n_pairs = pair.sum((1, 2)).to(rewards.dtype)
    has = n_pairs > 0
    per_prompt = torch.where(has, per_pair.sum((1, 2)) / n_pairs.clamp(min=1), torch.zeros_like(n_pairs))
    n_prompts = has.sum().to(rewards.dtype)
    loss = per_prompt.sum() / n_prompts.clamp(min=1)
    with torch.no_grad():
        total = n_pairs.sum()
        stats = {"accuracy": (pair & (d > 0)).sum().to(rewards.dtype) / total.clamp(min=1)}
    return loss, stats
