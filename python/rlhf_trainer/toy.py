"""The toy task, where the optimum of the KL-regularized objective is known exactly.

Prompts are the first ``prompt_len`` terms of an arithmetic sequence mod ``modulus``
(a, a+d, a+2d, ...); a response is ``response_len`` tokens; the hidden rule scores the
fraction of response tokens that continue the sequence. Because there are only
``vocab_size ** response_len`` responses per prompt, every expectation over the policy
is a finite sum, so for a reward r and coefficient beta

    J(pi) = E_x[ sum_y pi(y|x) r(x,y) ] - beta * E_x[ KL(pi(.|x) || pi_ref(.|x)) ]
    J*    = E_x[ beta * log sum_y pi_ref(y|x) exp(r(x,y)/beta) ]      (the maximum of J)

are computed exactly by scoring every response.
"""

import itertools

import torch

import rlhf_kernels as rk


class ToyTask:
    def __init__(self, cfg):
        self.cfg = cfg
        M, P = cfg.modulus, cfg.prompt_len
        params = [(a, d) for d in cfg.steps for a in range(M)]
        self.params = torch.tensor(params)                                   # [num_prompts, 2]
        idx = torch.arange(P)
        self.prompts = (self.params[:, :1] + idx * self.params[:, 1:]) % M   # [num_prompts, P]
        cont = torch.arange(P, P + cfg.response_len)
        self.targets = (self.params[:, :1] + cont * self.params[:, 1:]) % M  # [num_prompts, L]
        self.all_responses = torch.tensor(list(itertools.product(range(cfg.vocab_size),
                                                                 repeat=cfg.response_len)))  # [V**L, L]

    @property
    def num_prompts(self):
        return self.prompts.shape[0]

    def rule_reward(self, prompt_ids, responses):
        """Fraction of response tokens that continue the prompt's pattern.

        prompt_ids: [B] indices into self.prompts; responses: [B, L] token ids -> [B] float.
        """
        return (responses == self.targets[prompt_ids]).float().mean(-1)

    def sample_responses(self, prompt_ids, p_correct, gen):
        """Responses where each token is the rule's continuation with prob p_correct, else uniform."""
        B, L = prompt_ids.shape[0], self.cfg.response_len
        uniform = torch.randint(0, self.cfg.vocab_size, (B, L), generator=gen)
        hit = torch.rand(B, L, generator=gen) < p_correct
        return torch.where(hit, self.targets[prompt_ids], uniform)

    def responses_with_score(self, prompt_ids, n_correct, gen):
        """Responses with exactly n_correct[b] tokens continuing the pattern."""
        B, L = prompt_ids.shape[0], self.cfg.response_len
        targets = self.targets[prompt_ids]
        wrong = (targets + torch.randint(1, self.cfg.vocab_size, (B, L), generator=gen)) % self.cfg.vocab_size
        order = torch.rand(B, L, generator=gen).argsort(-1)
        hit = order < n_correct[:, None]
        return torch.where(hit, targets, wrong)


def sequence_logprobs(model, prompts, responses, chunk=4096):
    """log pi(y|x) summed over the response tokens, for every row. [B, P], [B, L] -> [B]."""
    P = prompts.shape[1]
    out = []
    with torch.no_grad():
        for s in range(0, prompts.shape[0], chunk):
            ids = torch.cat([prompts[s:s + chunk], responses[s:s + chunk]], 1)
            logits = model(input_ids=ids).logits[:, P - 1:-1]
            out.append(rk.token_logprobs(logits, responses[s:s + chunk]).sum(-1))
    return torch.cat(out)


def exact_objective(task, policy, ref_logp, scores, beta):
    """J of the policy for rewards ``scores`` [num_prompts, R], exactly, with its parts.

    ref_logp: [num_prompts, R] log pi_ref(y|x) over all R responses.
    """
    n, R = scores.shape
    prompts = task.prompts.repeat_interleave(R, 0)
    responses = task.all_responses.repeat(n, 1)
    logp = sequence_logprobs(policy, prompts, responses).view(n, R).double()
    p = logp.exp()
    reward = (p * scores.double()).sum(-1).mean()
    kl = (p * (logp - ref_logp.double())).sum(-1).mean()
    return {"J": (reward - beta * kl).item(), "reward": reward.item(), "kl": kl.item(), "probs": p}


def optimal_objective(ref_logp, scores, beta):
    """J* = E_x[beta * log sum_y pi_ref(y|x) exp(r(x,y)/beta)] (with beta = 0: E_x[max_y r])."""
    if beta == 0:
        return scores.double().max(-1).values.mean().item()
    return (beta * torch.logsumexp(ref_logp.double() + scores.double() / beta, -1)).mean().item()
