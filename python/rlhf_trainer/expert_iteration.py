"""Expert iteration: rounds of best-of-n sampling from the current policy, each followed by
supervised fine-tuning of the policy on the winners (cross-entropy, the response tokens'
log-probabilities from ``rk.linear_token_logprobs`` or ``rk.token_logprobs``).

It optimizes no KL-regularized objective: each round moves the policy toward best-of-n of
itself, whose KL to the policy is at most log n - (n - 1) / n, so the KL to the reference
grows round after round (it is evaluated exactly, and logged, at every round); the number of
rounds and n are what keep J = E[r] - beta KL from falling.
"""

import json
import os
import time

import torch

from rlhf_trainer.best_of_n import sample_best_of_n
from rlhf_trainer.models import build_policy, frozen_copy
from rlhf_trainer.runstate import rewrite_log, rng_state, save_checkpoint, seed_rngs, set_rng_state
from rlhf_trainer.sequences import response_logprobs, response_mask, score_function
from rlhf_trainer.toy import ExactEvaluator

CPU = torch.device("cpu")   # expert iteration runs on the toy task, on the CPU

LOG_KEYS = [
    "step", "samples", "score_mean", "winner_score_mean", "rule_reward_mean", "winner_rule_reward_mean",
    "sft_loss", "lr", "J", "J_star", "J_rule", "exact_kl",
    "time_rollout", "time_update", "time_eval", "time_step",
]


class ExpertIterationTrainer:
    """One ``train_step`` is one round; the trainer keeps PPOTrainer's interface (step,
    history, evaluate, save, load) so the demo drives both the same way."""

    def __init__(self, cfg, task, reward_model=None, reward_fn=None, run_dir=None, log=print, evaluator=None):
        if cfg.algo != "expert_iteration":
            raise ValueError("ExpertIterationTrainer runs expert_iteration, not algo: %s" % cfg.algo)
        self.cfg, self.task, self.log, self.run_dir = cfg, task, log, run_dir
        self.p = cfg.expert_iteration
        self._score = score_function(task, reward_model, reward_fn)
        self.policy = build_policy(cfg.model, cfg.task)
        self.ref = frozen_copy(self.policy)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=self.p.lr)
        self.gen = seed_rngs(cfg.seed)
        self.step = 0
        self.history = []
        self.evaluator = evaluator

    @property
    def total_steps(self):
        return self.p.rounds

    def evaluate(self):
        if self.evaluator is None:
            self.evaluator = ExactEvaluator(self.task, self.ref, self._score, self.cfg.beta)
        res = self.evaluator.evaluate(self.policy)
        return {k: res[k] for k in ("J", "J_star", "J_rule", "exact_kl")}

    def sft(self, prompts, responses):
        """``epochs`` passes of cross-entropy on (prompt, response) pairs; the mean loss."""
        p, tc = self.p, self.cfg.task
        Q = prompts.shape[0]
        losses = []
        for _ in range(p.epochs):
            order = torch.randperm(Q, generator=self.gen)
            for s in range(0, Q, p.minibatch):
                j = order[s:s + p.minibatch]
                mask = response_mask(responses[j], tc.eos_token_id, tc.stop_at_eos)
                logp = response_logprobs(self.policy, prompts[j], responses[j], mask, fused_lm_head=p.fused_lm_head)
                loss = -(logp * mask).sum() / mask.sum()         # token-mean cross-entropy
                self.opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), p.max_grad_norm)
                self.opt.step()
                losses.append(loss.item())
        return sum(losses) / len(losses)

    def train_step(self, evaluate=True):
        """One round: best-of-n from the current policy for ``prompts_per_round`` prompts, then SFT
        on the winners. The exact J and KL are evaluated at every round (``evaluate`` is ignored)."""
        p = self.p
        t0 = time.perf_counter()
        prompt_ids = torch.randint(0, self.task.num_prompts, (p.prompts_per_round,), generator=self.gen)
        winners, win_scores, responses, all_scores = sample_best_of_n(self.policy, self._score, self.task,
                                                                      prompt_ids, p.n)
        t1 = time.perf_counter()
        prompts = self.task.prompts[prompt_ids]
        sft_loss = self.sft(prompts, winners)
        t2 = time.perf_counter()
        self.step += 1
        ev = self.evaluate()
        t3 = time.perf_counter()
        row = {
            "step": self.step, "samples": self.step * p.prompts_per_round * p.n,
            "score_mean": all_scores.mean().item(), "winner_score_mean": win_scores.mean().item(),
            "rule_reward_mean": self.task.rule_reward(prompt_ids.repeat_interleave(p.n),
                                                      responses.flatten(0, 1)).mean().item(),
            "winner_rule_reward_mean": self.task.rule_reward(prompt_ids, winners).mean().item(),
            "sft_loss": sft_loss, "lr": p.lr, **ev,
            "time_rollout": t1 - t0, "time_update": t2 - t1, "time_eval": t3 - t2, "time_step": t3 - t0,
        }
        assert list(row) == LOG_KEYS
        self.log("round %d: KL to the reference %.4f, J %.4f (J* %.4f), winners' score %.3f"
                 % (self.step, ev["exact_kl"], ev["J"], ev["J_star"], row["winner_score_mean"]))
        self.history.append(row)
        if self.run_dir:
            with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def state_dict(self):
        return {"step": self.step, "policy": self.policy.state_dict(), "opt": self.opt.state_dict(),
                "history": self.history, "config": self.cfg.to_dict(), **rng_state(self.gen, CPU)}

    def save(self, path):
        save_checkpoint(self.state_dict(), path)

    def load(self, path):
        s = torch.load(path, weights_only=False)
        if s["config"] != self.cfg.to_dict():
            raise ValueError("checkpoint %s was written with another configuration" % path)
        self.step = s["step"]
        self.policy.load_state_dict(s["policy"])
        self.opt.load_state_dict(s["opt"])
        set_rng_state(self.gen, s, CPU)
        self.history = s["history"]
        rewrite_log(self.run_dir, self.history)
