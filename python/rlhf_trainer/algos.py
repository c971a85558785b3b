"""The critic-free algorithms: GRPO, RLOO and REINFORCE++, on the public rlhf_kernels API.

They share PPO's loop (``PPOTrainer``: rollout, score, ``epochs`` passes of clipped updates
with ``rk.ppo_policy_loss``, checkpoints, the JSONL log) and differ from it in three places:

  1. rollout: ``rollout_batch / group_size`` prompts, each answered ``group_size`` times;
  2. score:   no value model. Each response's reward is the reward model's score minus
              ``beta`` times the sequence-level k1 estimate of the KL to the reference,
                  R(x, y) = r(x, y) - beta * sum_t (log pi_old(y_t) - log pi_ref(y_t)),
              and its advantage comes from ``rk.group_advantages`` over its group (mode
              "grpo", "rloo" or "reinforce++"), the same for every token of the response;
  3. loss:    ``rk.ppo_policy_loss`` alone, aggregated as the algorithm's paper does.

Why the KL sits in the reward, as a sequence-level k1 term: for samples y ~ pi,
    grad J(pi) = grad (E_pi[r] - beta KL(pi || pi_ref)) = E_pi[ grad log pi(y|x) * R(x, y) ]
exactly (the extra term -beta E_pi[grad log pi] is zero), so a policy gradient on R is an
unbiased gradient of the J the evaluation reports; a baseline that does not depend on y
(the group's mean, the leave-one-out mean) keeps it unbiased. And at the optimum
pi* = pi_ref exp(r / beta) / Z, R(x, y) = beta log Z(x) is the same for every response,
so every group's advantages vanish: pi* is a fixed point of all three estimators. A k3 term
in the loss (GRPO's paper) has the gradient of KL(pi_ref || pi) instead, whose optimum is
not J's; k1 is the only estimator whose reward-side gradient is J's.
"""

import torch

import rlhf_kernels as rk
from rlhf_trainer.config import GROUP_MODES
from rlhf_trainer.ppo import PPOTrainer
from rlhf_trainer.sequences import response_mask


class GroupTrainer(PPOTrainer):
    """GRPO (``algo: grpo``), RLOO (``rloo``) and REINFORCE++ (``reinforce_pp``)."""
    uses_critic = False
    algos = tuple(GROUP_MODES)

    @property
    def kl_estimator(self):
        return "k1"

    @property
    def mode(self):
        return GROUP_MODES[self.cfg.algo]

    def sample_prompts(self):
        """rollout_batch / group_size prompts, each repeated group_size times (groups contiguous)."""
        G = self.p.group_size
        ids = torch.randint(0, self.task.num_prompts, (self.p.rollout_batch // G,), generator=self.gen)
        return ids.repeat_interleave(G)

    def score_rollout(self, prompt_ids, prompts, responses):
        p, tc = self.p, self.task.cfg
        mask = response_mask(responses, tc.eos_token_id, tc.stop_at_eos)
        with torch.no_grad():
            old_logp = self._chunked(lambda *a: self._logprobs(self.policy, *a), prompts, responses, mask)
            ref_logp = self._chunked(lambda *a: self._logprobs(self.ref, *a), prompts, responses, mask)
            score, has_eos = self._score_with_penalty(prompt_ids, responses)
            kl = rk.kl_penalty(old_logp, ref_logp, "k1") * mask          # per token, for the log
            rewards = score - self.kl_ctl.beta * kl.sum(-1)                 # R = r - beta * KL_k1(sequence)
            _, adv = rk.group_advantages(rewards, group_size=p.group_size, mode=self.mode, mask=mask)
        return {"prompt_ids": prompt_ids, "prompts": prompts, "responses": responses, "mask": mask,
                "rewards": rewards, "old_logp": old_logp, "ref_logp": ref_logp, "score": score,
                "kl": kl, "advantages": adv, "has_eos": has_eos}


def trainer_class(algo):
    """The trainer of a policy-gradient algorithm."""
    return PPOTrainer if algo == "ppo" else GroupTrainer
