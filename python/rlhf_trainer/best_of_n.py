"""Best-of-n: a decoding policy, not a training run. For each prompt, draw n responses from
the reference policy and return the one the reward model scores highest.

On the toy task its distribution is known exactly. Order a prompt's responses by reward and
let F be the CDF of pi_ref in that order. The best of n i.i.d. draws is at most y with
probability F(y)^n, so

    P_n(y) = F(y)^n - F(y-)^n                      (y- the response just below y)

and responses that tie share the probability of their tie group in proportion to pi_ref
(the draws that land in the group are i.i.d. pi_ref restricted to it, and the first one is
kept). Writing a group's mass m, the CDF below it b and a = b + m,

    P_n(y) = pi_ref(y) * g,   g = (a^n - b^n) / (a - b) = a^(n-1) (1 - t^n) / (1 - t),  t = b / a

so log P_n(y) / pi_ref(y) = log g is computed without cancellation (log t = -log1p(m / b)),
n = 1 gives g = 1 exactly, and

    KL(P_n || pi_ref) = sum_y P_n(y) log g(y)  <=  log n - (n - 1) / n

(the bound of Beirami et al., 2024, reached only when no response has a noticeable share
of pi_ref's mass).
"""

import math
import time

import torch

from rlhf_trainer.sequences import generate


def best_of_n_log_ratio(ref_logp, scores, n):
    """log P_n(y|x) - log pi_ref(y|x) for every response: [P, R] float64.

    ref_logp: [P, R] log pi_ref over all R responses of each prompt (normalized here, so the
    result is a distribution even when ref_logp sums to 1 only to float32 precision);
    scores: [P, R] the rewards that rank them; n >= 1 the number of draws."""
    if n < 1:
        raise ValueError("best-of-n: n must be >= 1, got %r" % (n,))
    logp = ref_logp.double()
    logp = logp - torch.logsumexp(logp, -1, keepdim=True)
    s = scores.double()
    out = torch.empty_like(logp)
    for i in range(logp.shape[0]):
        order = torch.argsort(s[i], stable=True)
        ss, pp = s[i][order], logp[i][order].exp()
        new = torch.ones_like(ss, dtype=torch.bool)
        new[1:] = ss[1:] != ss[:-1]
        gid = new.long().cumsum(0) - 1                                # tie group of each response
        G = int(gid[-1]) + 1
        m = torch.zeros(G, dtype=torch.float64).index_add_(0, gid, pp)  # each group's mass
        b = torch.cumsum(torch.cat([m.new_zeros(1), m[:-1]]), 0)     # CDF below each group
        a = b + m
        log_t = torch.where(b > 0, -torch.log1p(m / b.clamp_min(1e-300)), torch.full_like(b, -math.inf))
        # log g = (n - 1) log a + log(1 - t^n) - log(1 - t)
        log_g = (n - 1) * torch.log(a) + torch.log(-torch.expm1(n * log_t)) - torch.log(-torch.expm1(log_t))
        out[i, order] = log_g[gid]
    return out, logp


def kl_bound(n):
    """The bound log n - (n - 1) / n on KL(best-of-n || pi_ref)."""
    return math.log(n) - (n - 1) / n


def exact_best_of_n(evaluator, n):
    """Best-of-n from pi_ref, evaluated exactly with the evaluator's reward, rule and beta:
    E[r], KL (with the bound), J = E[r] - beta KL, the hidden-rule reward."""
    log_g, ref_logp = best_of_n_log_ratio(evaluator.ref_logp, evaluator.scores, n)
    p = (ref_logp + log_g).exp()
    reward = (p * evaluator.scores.double()).sum(-1).mean().item()
    kl = (p * log_g).sum(-1).mean().item()
    return {"n": n, "reward": reward, "exact_kl": kl, "kl_bound": kl_bound(n), "J": reward - evaluator.beta * kl,
            "J_star": evaluator.J_star, "J_rule": (p * evaluator.rule.double()).sum(-1).mean().item()}


@torch.no_grad()
def sample_best_of_n(model, score_fn, task, prompt_ids, n, temperature=1.0):
    """Best-of-n by sampling: n responses per prompt from ``model``, the best by ``score_fn``
    (the first drawn among ties). prompt_ids [Q] -> (the best responses [Q, L], their scores
    [Q], every response [Q, n, L], every score [Q, n])."""
    Q = prompt_ids.shape[0]
    pid = prompt_ids.repeat_interleave(n)
    responses = generate(model, task.prompts[pid], task.cfg, temperature)
    scores = score_fn(pid, responses).view(Q, n)
    best = scores.argmax(-1)                    # the first maximum
    rows = torch.arange(Q)
    responses = responses.view(Q, n, -1)
    return responses[rows, best], scores[rows, best], responses, scores


def run_best_of_n(cfg, task, ref, score_fn, evaluator, gen, log=print):
    """The best_of_n "run": its exact figures at n (and at n = 1, pi_ref itself), and a
    Monte Carlo check of E[r] from ``sample_queries`` prompts actually served by sampling."""
    c = cfg.best_of_n
    start = exact_best_of_n(evaluator, 1)
    end = exact_best_of_n(evaluator, c.n)
    out = {"start": start, "end": end, "sample_s": 0.0, "mc_reward": None, "mc_reward_se": None}
    if c.sample_queries:
        t0 = time.perf_counter()
        pid = torch.randint(0, task.num_prompts, (c.sample_queries,), generator=gen)
        _, best, _, _ = sample_best_of_n(ref, score_fn, task, pid, c.n)
        out["sample_s"] = time.perf_counter() - t0
        best = best.double()
        out["mc_reward"] = best.mean().item()
        out["mc_reward_se"] = (best.std() / math.sqrt(len(best))).item()
        log("best-of-%d: exact E[r] = %.4f; sampled over %d queries: %.4f +- %.4f (%.1f s)"
            % (c.n, end["reward"], c.sample_queries, out["mc_reward"], out["mc_reward_se"], out["sample_s"]))
    log("best-of-%d: exact KL %.4f (bound log n - (n-1)/n = %.4f), J = %.4f, J* = %.4f"
        % (c.n, end["exact_kl"], end["kl_bound"], end["J"], end["J_star"]))
    return out
