"""The two sets of token ops `python -m rlhf_trainer bench` gives the trainer's own PPO step.

The bench runs ``ppo.PPOTrainer``'s rollout, scoring and update in both modes; only the ops the
trainer calls (``PPOTrainer.ops``) and ``ppo.fused_lm_head`` differ:

``rlhf_kernels`` (kernels: on, ``fused_lm_head: true``): the log-probabilities come straight from
the last hidden states and the LM head's weight (``linear_token_logprobs``: the [tokens, V]
logits never exist), the policy objective with its entropy term is one ``linear_policy_loss``,
then ``kl_penalty``, ``gae``, ``masked_whiten`` and ``ppo_value_loss``.

``EagerOps`` (kernels: off, ``fused_lm_head: false``) is what a plain, competent PyTorch trainer
does, under the same names and arguments: logits from the model's own forward, kept for the
response positions only, one float32 ``log_softmax`` and a gather, the entropy from the full
softmax, GAE as a loop over time steps, and the losses written out in eager tensor ops with no
host sync.

Both compute the same numbers from the same inputs (tests/test_trainer_bench.py checks the
experience, losses, gradients and one whole update against each other); only how they get
there differs.
"""

import torch

import rlhf_kernels as rk

IGNORE = -100


def _token_mean(x, mask, num_tokens):
    """sum of x over valid tokens / num_tokens (a number or a 0-d tensor)."""
    return torch.where(mask, x, 0.0).sum() / num_tokens


def _only(op, name, value, allowed):
    if value not in allowed:
        raise ValueError("%s (kernels off): %s must be %s in the bench's eager ops, got %r"
                         % (op, name, " or ".join(map(repr, allowed)), value))


class EagerOps:
    """The subset of the rlhf_kernels API that ``PPOTrainer`` calls with ``fused_lm_head: false``
    (the bench's configuration: token-mean, no dual clip), in eager PyTorch."""
    name = "off"

    @staticmethod
    def token_logprobs(logits, labels, *, temperature=1.0, return_entropy=False):
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        mask = labels != IGNORE
        logp = torch.where(mask, logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
        if not return_entropy:
            return logp
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return logp, torch.where(mask, ent, 0.0)

    @staticmethod
    def kl_penalty(logp, ref_logp, kind="k1"):
        _only("kl_penalty", "kind", kind, ("k1",))
        return logp - ref_logp

    @staticmethod
    def gae(rewards, values, mask, *, gamma, lam):
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
        return adv, (adv + values) * m

    @staticmethod
    def masked_whiten(x, mask):
        m = mask.float()
        n = m.sum()
        mean = (x * m).sum() / n
        var = (((x - mean) ** 2) * m).sum() / (n - 1)
        return (x - mean) * torch.rsqrt(var + 1e-8) * m

    @staticmethod
    def ppo_policy_loss(logp, old_logp, adv, mask, *, clip_low, clip_high=None, dual_clip=None, loss_agg="token-mean",
                        num_tokens=None):
        _only("ppo_policy_loss", "loss_agg", loss_agg, ("token-mean",))
        _only("ppo_policy_loss", "dual_clip", dual_clip, (None,))
        clip_high = clip_low if clip_high is None else clip_high
        n = mask.sum()
        num_tokens = n if num_tokens is None else num_tokens
        log_ratio = logp - old_logp
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        loss = _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
        with torch.no_grad():
            r = ratio.detach()
            stats = {"clipfrac": torch.where(mask, clipped > unclipped, False).sum() / n,
                     "approx_kl": torch.where(mask, r - 1 - log_ratio.detach(), 0.0).sum() / n,
                     "ratio_mean": torch.where(mask, r, 0.0).sum() / n,
                     "ratio_max": torch.where(mask, r, -torch.inf).amax(),
                     "ratio_min": torch.where(mask, r, torch.inf).amin()}
        return loss, stats

    @staticmethod
    def ppo_value_loss(values, old_values, returns, mask, *, clip, loss_agg="token-mean", num_tokens=None):
        _only("ppo_value_loss", "loss_agg", loss_agg, ("token-mean",))
        n = mask.sum()
        num_tokens = n if num_tokens is None else num_tokens
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        l1, l2 = (values - returns) ** 2, (v_clipped - returns) ** 2
        loss = 0.5 * _token_mean(torch.maximum(l1, l2), mask, num_tokens)
        with torch.no_grad():
            def var(x):
                mean = torch.where(mask, x, 0.0).sum() / n
                return torch.where(mask, (x - mean) ** 2, 0.0).sum() / n
            var_r = var(returns)
            stats = {"vf_clipfrac": torch.where(mask, l2 > l1, False).sum() / n,
                     "explained_var": 1 - var(returns - values.detach()) / var_r}
        return loss, stats


# mode -> (the ops PPOTrainer calls, ppo.fused_lm_head)
OPS = {"on": (rk, True), "off": (EagerOps(), False)}
