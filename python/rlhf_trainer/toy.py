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
    top_p = 1.0          # pure sampling

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

    def build_policy(self, cfg):
        """The policy: a tiny GPT-2 from cfg.model (no downloads)."""
        from rlhf_trainer.models import build_policy
        return build_policy(cfg.model, cfg.task)

    def build_value(self, cfg):
        """The value model: a GPT-2 backbone of the same size with a scalar head."""
        from rlhf_trainer.models import ScalarHeadModel
        return ScalarHeadModel(cfg.model, cfg.task, seed_offset=1)

    def rule_reward(self, prompt_ids, responses):
        """Fraction of response tokens that continue the prompt's pattern.

        prompt_ids: [B] indices into self.prompts; responses: [B, L] token ids -> [B] float.
        """
        return (responses.to(self.targets.device) == self.targets[prompt_ids]).float().mean(-1)

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
            ids = torch.cat([prompts[s:s + chunk], responses[s:s + chunk]], 1).to(model.device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, P - 1:-1]
            out.append(rk.token_logprobs(logits, responses[s:s + chunk].to(model.device)).sum(-1).cpu())
    return torch.cat(out)


def all_response_logprobs(model, task, chunk=4096):
    """log pi(y|x) of every response of every prompt: [num_prompts, V**L], with one forward
    pass per response *prefix* (V**(L-1) sequences of P + L - 1 tokens per prompt instead of
    V**L of P + L): the logits after a prefix give every token's log-probability at once."""
    V, L = task.cfg.vocab_size, task.cfg.response_len
    n, P = task.prompts.shape
    prefixes = task.all_responses[::V, :L - 1]              # [V**(L-1), L-1], product order
    K = prefixes.shape[0]
    ys = task.all_responses                                  # [R, L]; response r has prefix r // V
    rows = (torch.arange(ys.shape[0]) // V)[:, None]
    out = []
    with torch.no_grad():
        for s in range(0, n, max(1, chunk // K)):
            prompts = task.prompts[s:s + max(1, chunk // K)]
            m = prompts.shape[0]
            ids = torch.cat([prompts.repeat_interleave(K, 0), prefixes.repeat(m, 1)], 1).to(model.device)
            # the toy's PAD token is a response token like any other here: every position is real
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, P - 1:]   # [m*K, L, V]
            every = torch.arange(V, device=model.device).expand(m * K, L, V)
            lp = rk.token_logprobs(logits.unsqueeze(2).expand(-1, -1, V, -1), every).view(m, K, L, V).cpu()
            out.append(lp[:, rows, torch.arange(L)[None, :], ys].sum(-1))
    return torch.cat(out)


def optimal_objective(ref_logp, scores, beta):
    """J* = E_x[beta * log sum_y pi_ref(y|x) exp(r(x,y)/beta)] (with beta = 0: E_x[max_y r])."""
    if beta == 0:
        return scores.double().max(-1).values.mean().item()
    return (beta * torch.logsumexp(ref_logp.double() + scores.double() / beta, -1)).mean().item()


class ExactEvaluator:
    """Every (prompt, response) pair of the toy task scored once: the reward J is defined
    with (``score_fn``, e.g. the reward model's), the hidden rule's reward, and log pi_ref.
    Any policy, trained or not, is then evaluated exactly from its log-probabilities over
    the ``V**L`` responses of each prompt; one evaluator serves every algorithm of a run."""

    def __init__(self, task, ref, score_fn, beta, chunk=8192, ref_logp=None):
        """ref_logp: log pi_ref of every response [num_prompts, R], when already computed (an
        evaluator per reward model of one reference: iterated RLHF, the over-optimization sweep)."""
        R = task.all_responses.shape[0]
        n = task.num_prompts
        pid = torch.arange(n).repeat_interleave(R)
        resp = task.all_responses.repeat(n, 1)
        with torch.no_grad():
            s = torch.cat([score_fn(pid[i:i + chunk], resp[i:i + chunk]).cpu() for i in range(0, len(pid), chunk)])
        self.task, self.beta = task, beta
        self.scores = s.view(n, R)                                    # [num_prompts, R]
        self.rule = task.rule_reward(pid, resp).view(n, R)            # [num_prompts, R]
        self.ref_logp = all_response_logprobs(ref, task) if ref_logp is None else ref_logp
        self.J_star = optimal_objective(self.ref_logp, self.scores, beta)

    def policy_logp(self, policy):
        """log pi(y|x) of every response of every prompt: [num_prompts, R] float64."""
        return all_response_logprobs(policy, self.task).double()

    def from_logp(self, logp):
        """J, J*, the hidden-rule reward and KL(pi || pi_ref) (mean over prompts) of the
        distribution with log-probabilities ``logp`` [num_prompts, R], exactly."""
        p = logp.exp()
        reward = (p * self.scores.double()).sum(-1).mean()
        kl = (p * (logp - self.ref_logp.double())).sum(-1).mean()
        return {"J": (reward - self.beta * kl).item(), "J_star": self.J_star,
                "J_rule": (p * self.rule.double()).sum(-1).mean().item(), "exact_kl": kl.item(),
                "reward": reward.item()}

    def evaluate(self, policy):
        return self.from_logp(self.policy_logp(policy))

    def optimal_logp(self):
        """log pi*(y|x) = log pi_ref(y|x) + r(x,y)/beta - log Z(x), the maximizer of J (beta > 0)."""
        return torch.log_softmax(self.ref_logp.double() + self.scores.double() / self.beta, -1)

    def greedy(self):
        """The reward maximizer that ignores the KL: each prompt's best-scored response with
        probability 1. J(greedy) says how much the KL term matters at this beta."""
        best = self.scores.double().argmax(-1, keepdim=True)
        reward = self.scores.double().gather(1, best).mean()
        kl = -self.ref_logp.double().gather(1, best).mean()
        return {"J": (reward - self.beta * kl).item(), "J_star": self.J_star, "reward": reward.item(),
                "exact_kl": kl.item(), "J_rule": self.rule.double().gather(1, best).mean().item()}
