"""Reward-model losses on absolute scores: regression and the ordinal cumulative-link model."""

import math

import torch
import torch.nn.functional as F

from rlhf_kernels._layout import SCORE_KINDS, SCORE_STATS  # noqa: F401 (re-exported)


def _pop_std(x, n):
    mean = x.sum() / n
    return mean, (((x - mean) ** 2).sum() / n).sqrt()


def regression_loss(pred, score):
    """pred, score: [P]. loss = mean(0.5 * (pred - score)^2); stats mse, mae, pred_mean,
    pred_std (population, divided by P). An empty batch gives loss 0 and stats 0."""
    n = max(pred.shape[0], 1)
    err = pred - score
    loss = 0.5 * (err ** 2).sum() / n
    with torch.no_grad():
        e = err.detach()
        mean, std = _pop_std(pred.detach(), n)
        stats = {"mse": (e ** 2).sum() / n, "mae": e.abs().sum() / n, "pred_mean": mean, "pred_std": std}
    return loss, stats


def level_log_probs(pred, thresholds):
    """log P(level = k | pred) for k in [0, K): [P, K], under the cumulative-link model
    P(level <= k) = sigmoid(t_k - pred), with t_{-1} = -inf and t_{K-1} = +inf.

    P(level = k) = sigmoid(t_k - x) - sigmoid(t_{k-1} - x)
                 = sigmoid(t_k - x) * sigmoid(x - t_{k-1}) * (1 - exp(-(t_k - t_{k-1}))),
    so its log is logsigmoid(t_k - x) + logsigmoid(x - t_{k-1}) + log(-expm1(-gap)): no
    difference of two probabilities near 1. An empty interval (gap = 0) gives -inf, a reversed
    one (gap < 0) NaN.
    """
    inf = thresholds.new_full((1,), math.inf)
    t = torch.cat([-inf, thresholds, inf])                     # t[k + 1] = t_k
    upper, lower = t[1:], t[:-1]                               # [K] each: t_k, t_{k-1}
    gap = upper - lower
    x = pred[:, None]
    return F.logsigmoid(upper - x) + F.logsigmoid(x - lower) + torch.log(-torch.expm1(-gap))


def ordinal_loss(pred, level, thresholds):
    """pred: [P] float; level: [P] integer in [0, K); thresholds: [K-1] float, increasing.

    loss = mean(-log P(level | pred)) (level_log_probs). A level outside [0, K) gives NaN for
    its element (and no gradient from it). Stats: accuracy = mean(most likely level == level)
    (the lowest one on a tie); mae = mean |E[level | pred] - level| with
    E[level | pred] = sum_k sigmoid(pred - t_k); pred_mean, pred_std (population).
    """
    P, K = pred.shape[0], thresholds.shape[0] + 1
    n = max(P, 1)
    bad = (level < 0) | (level >= K)
    y = level.clamp(0, K - 1).long()
    inf = thresholds.new_full((1,), math.inf)
    t = torch.cat([-inf, thresholds, inf])
    upper, lower = t[y + 1], t[y]                              # t_y, t_{y-1}
    nll = -(F.logsigmoid(upper - pred) + F.logsigmoid(pred - lower) + torch.log(-torch.expm1(-(upper - lower))))
    nll = torch.where(bad, torch.full_like(nll, math.nan), nll)
    loss = nll.sum() / n
    with torch.no_grad():
        x, th = pred.detach(), thresholds.detach()
        most_likely = level_log_probs(x, th).argmax(1) if P else y
        expected = torch.sigmoid(x[:, None] - th[None, :]).sum(1)
        mean, std = _pop_std(x, n)
        stats = {"accuracy": (most_likely == level).to(x.dtype).sum() / n,
                 "mae": (expected - level.to(x.dtype)).abs().sum() / n, "pred_mean": mean, "pred_std": std}
    return loss, stats


def score_loss(pred, score, kind="regression", thresholds=None):
    """The loss and stats of ``rk.score_loss`` (see there): ``regression_loss`` or ``ordinal_loss``."""
    if kind == "regression":
        return regression_loss(pred, score)
    return ordinal_loss(pred, score, thresholds)
