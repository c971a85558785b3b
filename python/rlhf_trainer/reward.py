"""Reward-model training on synthetic preferences labelled by the hidden rule.

Pairwise (Bradley-Terry, ``rk.bt_loss``) or K-way rankings (``rk.ranking_loss``): the
comparisons come from responses with a known number of tokens that follow the rule, so
the label is the rule's, and held-out accuracy says whether the model learned it.
"""

import torch

import rlhf_kernels as rk
from rlhf_trainer.models import ScalarHeadModel


def make_comparisons(task, cfg, n, gen):
    """n comparisons: (prompt ids [n], responses [n, K, L] ordered best first, valid [n, K])."""
    L = task.cfg.response_len
    prompt_ids = torch.randint(0, task.num_prompts, (n,), generator=gen)
    k = 2 if cfg.loss == "bt" else cfg.k
    # distinct numbers of rule-following tokens, best first: a strict order, no ties
    counts = torch.stack([torch.randperm(L + 1, generator=gen)[:min(k, L + 1)] for _ in range(n)])
    counts = counts.sort(-1, descending=True).values
    K = counts.shape[1]
    responses = torch.stack([task.responses_with_score(prompt_ids, counts[:, j], gen) for j in range(K)], 1)
    valid = torch.ones(n, K, dtype=torch.bool)
    if cfg.loss == "ranking" and K > 2:
        # ragged rankings: drop the tail of some of them
        keep = torch.randint(2, K + 1, (n,), generator=gen)
        valid = torch.arange(K)[None, :] < keep[:, None]
    return prompt_ids, responses, valid


def _scores(model, task, prompt_ids, responses):
    n, K, L = responses.shape
    ids = torch.cat([task.prompts[prompt_ids].repeat_interleave(K, 0), responses.reshape(n * K, L)], 1)
    return model.score(ids.to(next(model.parameters()).device)).view(n, K)


def rm_loss(model, task, cfg, prompt_ids, responses, valid):
    s = _scores(model, task, prompt_ids, responses)
    if cfg.loss == "bt":
        return rk.bt_loss(s[:, 0], s[:, 1], label_smoothing=cfg.label_smoothing, center_coef=cfg.center_coef)
    return rk.ranking_loss(s, valid=valid.to(s.device))


def pair_counts(s, valid):
    """Scores s [P, K] of K responses ranked best first, valid [P, K] -> (the valid ordered pairs
    i < j scored s_i > s_j, the valid ordered pairs): the counts behind a pairwise accuracy."""
    K = s.shape[1]
    right, total = 0, 0
    for i in range(K):
        for j in range(i + 1, K):
            both = valid[:, i] & valid[:, j]
            right += ((s[:, i] > s[:, j]) & both).sum().item()
            total += both.sum().item()
    return right, total


def pairwise_accuracy(model, task, prompt_ids, responses, valid):
    """Fraction of valid ordered pairs (i < j) the model scores in the right order."""
    with torch.no_grad():
        s = _scores(model, task, prompt_ids, responses).cpu()
    right, total = pair_counts(s, valid)
    return right / max(total, 1)


def train_reward_model(task, model_cfg, cfg, seed, log=print, device="cpu"):
    """Train a reward model on ``device``; returns (model, metrics dict with held-out accuracy).
    cfg.loss regression or ordinal: from Likert ratings (``scores.train_score_model``); cfg.noise:
    the annotator's noise (``scores``), on the training comparisons only."""
    from rlhf_trainer.scores import SCORE_LOSSES, noisy_order, train_score_model
    if cfg.loss in SCORE_LOSSES:
        return train_score_model(task, model_cfg, cfg, seed, log, device)
    gen = torch.Generator().manual_seed(seed + 17)
    train = make_comparisons(task, cfg, cfg.num_train, gen)
    if cfg.noise:
        train = noisy_order(task, train, cfg.noise, gen)
    held_out = make_comparisons(task, cfg, cfg.num_eval, gen)
    model = ScalarHeadModel(model_cfg, task.cfg, seed_offset=2).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.steps)
    history = []
    for step in range(cfg.steps):
        idx = torch.randint(0, cfg.num_train, (cfg.batch_size,), generator=gen)
        loss, stats = rm_loss(model, task, cfg, *(t[idx] for t in train))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            row = {"rm_step": step, "loss": loss.item(), "accuracy": stats["accuracy"].item()}
            if "margin_mean" in stats:
                row["margin"] = stats["margin_mean"].item()
            history.append(row)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # scores on a unit scale over the training responses (the BT scale is arbitrary)
    with torch.no_grad():
        pid, resp, valid = (t[:cfg.num_eval] for t in train)
        s = _scores(model, task, pid, resp)[valid.to(device)]
    model.standardize_(s.mean(), s.std())
    acc = pairwise_accuracy(model, task, *held_out)
    train_acc = pairwise_accuracy(model, task, *(t[:cfg.num_eval] for t in train))
    log("reward model (%s): held-out accuracy %.3f, train accuracy %.3f, final loss %.4f"
        % (cfg.loss, acc, train_acc, history[-1]["loss"]))
    return model, {"rm_accuracy": acc, "rm_train_accuracy": train_acc, "rm_history": history}
