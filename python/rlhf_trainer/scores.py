"""Reward models from absolute scores (Likert ratings), beside those from comparisons.

The toy task's annotator. A response y to prompt x has the hidden-rule reward r(x, y) in
[0, 1] (the fraction of its tokens that continue the pattern: 0, 1/3, 2/3 or 1 with three
tokens). For each judgement the annotator perceives a latent quality

    z = r(x, y) + noise * e,    e ~ N(0, 1), drawn afresh for every response of every judgement,

and either
  - **rates** the response on a 1..7 Likert scale: [0, 1] is cut into 7 equal bins by the fixed
    cut points 1/7, ..., 6/7, and the rating is 1 + the number of cut points at or below z (z < 1/7
    gives 1, z >= 6/7 gives 7): with noise 0, r = 0, 1/3, 2/3, 1 is rated 1, 3, 5, 7;
  - or **compares** two responses and prefers the one with the higher z: two responses whose
    rewards differ by d are put in the wrong order with probability Phi(-d / (noise * sqrt 2)).

``reward_model.noise`` is that standard deviation, for both kinds of feedback (0: exact labels;
the comparisons are then exactly today's). A reward model is trained from scores with
``rk.score_loss``: ``regression`` (squared error on the rating mapped linearly onto [-1, 1]) or
``ordinal`` (a cumulative-link logistic model over the 7 levels, with 6 increasing thresholds
trained beside the model: ``Thresholds``). Either way the reward is the model's scalar, read at
the last token, and is standardized over the training responses as a comparison-trained one is.
"""

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

import rlhf_kernels as rk
from rlhf_trainer.config import SCORE_LOSSES  # noqa: F401 (the score losses, named once)

LIKERT_LEVELS = 7                                              # ratings 1..7
LIKERT_CUTS = torch.arange(1, LIKERT_LEVELS, dtype=torch.float64) / LIKERT_LEVELS   # 1/7, ..., 6/7


def latent(task, prompt_ids, responses, noise, gen):
    """The annotator's perceived quality z = r + noise * N(0, 1): [...] responses [..., L] -> [...] float64.
    noise = 0 draws nothing from ``gen``."""
    r = task.rule_reward(prompt_ids.reshape(-1), responses.reshape(-1, responses.shape[-1])).double()
    r = r.view(responses.shape[:-1])
    if noise == 0:
        return r
    return r + noise * torch.randn(r.shape, generator=gen, dtype=torch.float64)


def likert(z):
    """Ratings 1..7 [...] int64 of latent qualities z [...]: 1 + the number of cut points <= z."""
    return 1 + (z[..., None] >= LIKERT_CUTS).sum(-1)


def make_scores(task, n, noise, gen):
    """n rated responses: (prompt ids [n], responses [n, L], ratings [n] in 1..7). The number of
    rule-following tokens of each response is uniform over 0..L, as in the comparisons."""
    L = task.cfg.response_len
    prompt_ids = torch.randint(0, task.num_prompts, (n,), generator=gen)
    counts = torch.randint(0, L + 1, (n,), generator=gen)
    responses = task.responses_with_score(prompt_ids, counts, gen)
    return prompt_ids, responses, likert(latent(task, prompt_ids, responses, noise, gen))


def noisy_order(task, comparisons, noise, gen):
    """Comparisons (prompt ids [n], responses [n, K, L] best first by the rule, valid [n, K]) as
    the annotator labels them: each valid list reordered by its responses' latents, best first."""
    prompt_ids, responses, valid = comparisons
    n, K, L = responses.shape
    z = latent(task, prompt_ids[:, None].expand(n, K), responses, noise, gen)
    order = z.masked_fill(~valid, -math.inf).argsort(dim=-1, descending=True, stable=True)
    return prompt_ids, responses.gather(1, order[..., None].expand(n, K, L)), valid


def regression_target(score, lo, hi):
    """A score in [lo, hi] mapped linearly onto [-1, 1] (float32): the regression's target."""
    return (2 * (score.double() - lo) / (hi - lo) - 1).float()


class Thresholds(nn.Module):
    """The K - 1 increasing cut points of the ordinal loss: first + cumsum(MIN_GAP + softplus(increments)),
    increasing whatever the parameters (in float32 too). Initialized at the logits of the empirical cumulative
    level frequencies, so a model that scores every response 0 starts at the data's marginal."""

    MIN_GAP = 1e-3

    def __init__(self, levels, K):
        """levels: [n] int64 training levels in [0, K); K >= 2."""
        super().__init__()
        n = max(levels.numel(), 1)
        cum = torch.bincount(levels, minlength=K)[:K - 1].cumsum(0).double() / n
        cum = cum.clamp(0.5 / n, 1 - 0.5 / n)
        t = torch.log(cum) - torch.log1p(-cum)
        gaps = (t[1:] - t[:-1]).clamp(min=1e-2)                 # empty levels: a small step
        self.first = nn.Parameter(t[:1].float())
        self.increments = nn.Parameter(torch.log(torch.expm1(gaps - self.MIN_GAP)).float())   # softplus^-1

    def forward(self):
        return torch.cat([self.first, self.first + (self.MIN_GAP + F.softplus(self.increments)).cumsum(0)])


def score_loss(pred, target, kind, thresholds=None):
    """rk.score_loss of the reward head's scalars ``pred`` [P]: ``target`` is the regression
    target [P] float (``regression_target``) or the level [P] int64 (ordinal), ``thresholds`` the
    ``Thresholds`` module for ordinal."""
    if kind == "ordinal":
        return rk.score_loss(pred, target, kind="ordinal", thresholds=thresholds())
    return rk.score_loss(pred, target, kind="regression")


def score_pair_counts(pred, score):
    """(pairs of responses with different scores that pred orders as the scores do, such pairs):
    pred [n], score [n] -> two ints (pairs with equal pred count as wrong), in row chunks."""
    right = total = 0
    for s in range(0, pred.shape[0], 1024):
        higher = score[s:s + 1024, None] > score[None, :]
        right += (higher & (pred[s:s + 1024, None] > pred[None, :])).sum().item()
        total += higher.sum().item()
    return right, total


def train_score_model(task, model_cfg, cfg, seed, log=print, device="cpu"):
    """A toy reward model trained on cfg.num_train Likert ratings (cfg.loss regression or
    ordinal, cfg.noise); returns (model, metrics) as ``reward.train_reward_model`` does: the
    held-out accuracy is on exact comparisons (no noise), as for a comparison-trained model."""
    from rlhf_trainer.models import ScalarHeadModel
    from rlhf_trainer.reward import _scores, make_comparisons, pairwise_accuracy
    gen = torch.Generator().manual_seed(seed + 17)
    pid, resp, rating = make_scores(task, cfg.num_train, cfg.noise, gen)
    held_out = make_comparisons(task, dataclasses.replace(cfg, loss="bt"), cfg.num_eval, gen)   # exact pairs
    model = ScalarHeadModel(model_cfg, task.cfg, seed_offset=2).to(device)
    if cfg.loss == "ordinal":
        target = rating - 1
        thresholds = Thresholds(target, LIKERT_LEVELS).to(device)
        params = list(model.parameters()) + list(thresholds.parameters())
    else:
        target, thresholds = regression_target(rating, 1, LIKERT_LEVELS), None
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.steps)
    history = []
    for step in range(cfg.steps):
        idx = torch.randint(0, cfg.num_train, (cfg.batch_size,), generator=gen)
        pred = _scores(model, task, pid[idx], resp[idx, None])[:, 0]
        loss, stats = score_loss(pred, target[idx].to(device), cfg.loss, thresholds)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"rm_step": step, "loss": loss.item(), **{k: v.item() for k, v in stats.items()}})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        s = _scores(model, task, pid[:cfg.num_eval], resp[:cfg.num_eval, None])[:, 0]
    right, total = score_pair_counts(s.cpu(), rating[:cfg.num_eval])
    model.standardize_(s.mean(), s.std())
    acc = pairwise_accuracy(model, task, *held_out)
    log("reward model (%s, %d ratings, noise %g): held-out accuracy %.3f, train pair accuracy %.3f, final loss %.4f"
        % (cfg.loss, cfg.num_train, cfg.noise, acc, right / max(total, 1), history[-1]["loss"]))
    metrics = {"rm_accuracy": acc, "rm_train_accuracy": right / max(total, 1), "rm_history": history}
    if thresholds is not None:
        metrics["rm_thresholds"] = thresholds().detach().cpu().tolist()
    return model, metrics
