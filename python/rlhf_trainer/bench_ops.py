"""The two ways `python -m rlhf_trainer bench` computes a PPO step's token math.

``KernelOps`` (kernels: on) goes through rlhf_kernels' public API: the per-token
log-probabilities and entropy come straight from the last hidden states and the LM head's
weight (``linear_token_logprobs``: the [tokens, V] logits never exist), then ``kl_penalty``,
``gae``, ``masked_whiten``, ``ppo_policy_loss`` and ``ppo_value_loss``. When the fused
head-plus-loss op ``rlhf_kernels.linear_policy_loss`` is importable, the policy objective
uses it instead of ``linear_token_logprobs`` + ``ppo_policy_loss``.

``EagerOps`` (kernels: off) is what a plain, competent PyTorch trainer does: logits from the
model's own forward, kept for the response positions only (``logits_to_keep``), one float32
``log_softmax`` and a gather, the entropy from the full softmax, GAE as a loop over time
steps, and the losses written out in eager tensor ops with no host sync.

Both take the same inputs and compute the same numbers (tests/test_trainer_bench.py checks
losses and gradients against each other); only how they get there differs.
"""

import torch

import rlhf_kernels as rk

IGNORE = -100


def response_hidden(model, input_ids, attention_mask, response_len):
    """Last hidden states at the positions that predict the response tokens:
    [B, S] ids -> [B, T, H] (positions S-T-1 .. S-2)."""
    h = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return h[:, -response_len - 1:-1]


def token_mean(x, mask, num_tokens):
    """sum of x over valid tokens / num_tokens (a number or a 0-d tensor)."""
    return torch.where(mask, x, 0.0).sum() / num_tokens


class KernelOps:
    name = "on"

    def logprobs(self, policy, input_ids, attention_mask, labels, mask, temperature):
        """no-grad pass: -> logp [B, T] float32 (0 where mask is false)."""
        h = response_hidden(policy, input_ids, attention_mask, labels.shape[1])
        y = labels.masked_fill(~mask, IGNORE)
        return rk.linear_token_logprobs(h, policy.lm_head.weight, y, temperature=temperature)

    def kl(self, logp, ref_logp):
        return rk.kl_penalty(logp, ref_logp, "k1")

    def advantages(self, rewards, values, mask, gamma, lam):
        adv, returns = rk.gae(rewards, values, mask, gamma=gamma, lam=lam)
        return rk.masked_whiten(adv, mask), returns

    def policy_objective(self, policy, input_ids, attention_mask, labels, mask, old_logp, adv, num_tokens, cfg):
        """-> (policy loss - ent_coef * mean entropy, stats); one function, so that the fused
        head + loss op replaces the two calls when it lands."""
        h = response_hidden(policy, input_ids, attention_mask, labels.shape[1])
        y = labels.masked_fill(~mask, IGNORE)
        w = policy.lm_head.weight
        if hasattr(rk, "linear_policy_loss"):
            loss, stats = rk.linear_policy_loss(h, w, y, old_logp, adv, mask, temperature=cfg.temperature,
                                                entropy_coef=cfg.ent_coef, clip_low=cfg.clip, loss_agg="token-mean",
                                                num_tokens=num_tokens)
            # its entropy stat is the mean over this micro-batch's valid tokens; the step logs the
            # sum over them / num_tokens (the term of the loss), as the unfused branch below
            ent = stats["entropy"] * (mask.sum() / num_tokens)
            return loss, {"clipfrac": stats["clipfrac"], "approx_kl": stats["approx_kl"], "entropy": ent.detach()}
        logp, entropy = rk.linear_token_logprobs(h, w, y, temperature=cfg.temperature, return_entropy=True)
        pg, stats = rk.ppo_policy_loss(logp, old_logp, adv, mask, clip_low=cfg.clip, num_tokens=num_tokens)
        ent = token_mean(entropy, mask, num_tokens)
        return pg - cfg.ent_coef * ent, {"clipfrac": stats["clipfrac"], "approx_kl": stats["approx_kl"],
                                         "entropy": ent.detach()}

    def value_loss(self, values, old_values, returns, mask, num_tokens, cfg):
        loss, stats = rk.ppo_value_loss(values, old_values, returns, mask, clip=cfg.vf_clip, num_tokens=num_tokens)
        return loss, {"vf_clipfrac": stats["vf_clipfrac"]}


class EagerOps:
    name = "off"

    @staticmethod
    def _token_logprobs(policy, input_ids, attention_mask, labels, mask, temperature, entropy):
        T = labels.shape[1]
        logits = policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                        logits_to_keep=T + 1).logits[:, :-1]
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logp = torch.where(mask, logp, 0.0)
        if not entropy:
            return logp
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return logp, torch.where(mask, ent, 0.0)

    def logprobs(self, policy, input_ids, attention_mask, labels, mask, temperature):
        return self._token_logprobs(policy, input_ids, attention_mask, labels, mask, temperature, False)

    def kl(self, logp, ref_logp):
        return logp - ref_logp

    def advantages(self, rewards, values, mask, gamma, lam):
        """The per-step loop of the popular trainers (right padding: masked steps are zeroed)."""
        m = mask.float()
        values, rewards = values * m, rewards * m
        T = rewards.shape[1]
        last = torch.zeros_like(rewards[:, 0])
        reversed_adv = []
        for t in reversed(range(T)):
            next_v = values[:, t + 1] if t + 1 < T else 0.0
            delta = rewards[:, t] + gamma * next_v - values[:, t]
            last = delta + gamma * lam * last
            reversed_adv.append(last)
        adv = torch.stack(reversed_adv[::-1], dim=1) * m
        returns = (adv + values) * m
        n = m.sum()
        mean = (adv * m).sum() / n
        var = (((adv - mean) ** 2) * m).sum() / (n - 1)
        return (adv - mean) * torch.rsqrt(var + 1e-8) * m, returns

    def policy_objective(self, policy, input_ids, attention_mask, labels, mask, old_logp, adv, num_tokens, cfg):
        logp, entropy = self._token_logprobs(policy, input_ids, attention_mask, labels, mask, cfg.temperature, True)
        log_ratio = logp - old_logp
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - cfg.clip, 1.0 + cfg.clip)
        pg = token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
        ent = token_mean(entropy, mask, num_tokens)
        with torch.no_grad():
            n = mask.sum()
            stats = {"clipfrac": (torch.where(mask, clipped > unclipped, False)).sum() / n,
                     "approx_kl": torch.where(mask, ratio - 1 - log_ratio, 0.0).sum() / n,
                     "entropy": ent.detach()}
        return pg - cfg.ent_coef * ent, stats

    def value_loss(self, values, old_values, returns, mask, num_tokens, cfg):
        clipped = old_values + torch.clamp(values - old_values, -cfg.vf_clip, cfg.vf_clip)
        l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
        loss = 0.5 * token_mean(torch.maximum(l1, l2), mask, num_tokens)
        with torch.no_grad():
            vf_clipfrac = torch.where(mask, l2 > l1, False).sum() / mask.sum()
        return loss, {"vf_clipfrac": vf_clipfrac}


OPS = {"on": KernelOps, "off": EagerOps}
