"""PPO with a per-token KL penalty to a frozen reference, on the public rlhf_kernels API.
(The critic-free algorithms reuse this trainer's loop: see ``algos.py``.)

One step:
  1. rollout: sample prompts, generate responses with the policy (``generate``);
  2. score:   old and reference log-probabilities with ``token_logprobs`` (never the
              generation scores), values, the reward (a reward model's score or a Python
              function) on the last real token, minus beta * ``kl_penalty`` on every token;
  3. ``gae`` and ``masked_whiten`` of the advantages;
  4. ``epochs`` passes over minibatches, each accumulated over micro-batches, with
     ``ppo_policy_loss`` and ``ppo_value_loss`` normalized by the minibatch's global token
     count (so the result does not depend on the micro-batch split), an entropy term from
     ``token_logprobs(..., return_entropy=True)``, and gradient clipping. With
     ``fused_lm_head`` the policy loss and entropy term are one ``linear_policy_loss`` on the
     backbone's hidden states (old and reference log-probabilities: ``linear_token_logprobs``);
  5. the KL controller update, one JSONL line, checkpoints.
"""

import json
import math
import os
import time
import warnings

import torch

import rlhf_kernels as rk
from rlhf_trainer import parallel
from rlhf_trainer.config import RewardFunctionError
from rlhf_trainer.devices import resolve_device
from rlhf_trainer.models import enable_checkpointing, frozen_copy
from rlhf_trainer.runstate import rewrite_log, rng_state, save_checkpoint, seed_rngs, set_rng_state
from rlhf_trainer.sequences import (PROMPT_PAD, _eval_mode, generate, is_eos, response_hidden, response_logprobs,
                                    response_mask, root_call, score_function, sequences)
from rlhf_trainer.toy import ExactEvaluator

# The JSONL schema: one object per PPO step with exactly these keys (time_* are wall clock
# seconds, so they are the only fields that differ between two identical runs).
LOG_KEYS = [
    "step", "score_mean", "score_std", "rule_reward_mean",
    "kl_seq_sum", "kl_token_mean", "kl_estimator", "beta",
    "entropy", "approx_kl", "clipfrac", "ratio_mean", "ratio_max", "ratio_min", "first_ratio_max_dev",
    "policy_loss", "value_loss", "vf_clipfrac", "explained_var",
    "response_length", "eos_rate", "lr",
    "J", "J_star", "J_rule", "exact_kl",
    "time_rollout", "time_score", "time_update", "time_eval", "time_step",
]
TIME_KEYS = [k for k in LOG_KEYS if k.startswith("time_")]


class KLController:
    """Adaptive KL coefficient in the original units (per-sequence KL sum):
    e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon. Fixed when not adaptive."""

    def __init__(self, beta, adaptive, target, horizon):
        self.beta, self.adaptive, self.target, self.horizon = float(beta), adaptive, target, horizon

    def update(self, kl_seq_sum, n):
        if self.adaptive:
            e = min(max(kl_seq_sum / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + e * n / self.horizon

    def state_dict(self):
        return {"beta": self.beta}

    def load_state_dict(self, state):
        self.beta = state["beta"]


class PPOTrainer:
    """PPO, and (through ``uses_critic = False`` and the hooks ``sample_prompts`` and
    ``score_rollout``) the base of the critic-free trainers in ``algos.py``."""
    uses_critic = True
    algos = ("ppo",)
    # the token ops of the step (log-probabilities, KL penalty, GAE, whitening, losses): rlhf_kernels;
    # the whole-step bench gives the same step eager ops of the same names (bench_ops.EagerOps)
    ops = rk

    def __init__(self, cfg, task, reward_model=None, reward_fn=None, run_dir=None, log=print, evaluator=None):
        """cfg: a Config; task: the toy task (``toy.ToyTask``) or prompts for real models
        (``hf.PromptTask``), which builds the policy and value models. reward_model: a
        ScalarHeadModel read at the last real token (on the trainer's device); or
        reward_fn(prompt_ids, responses) -> [B] scores. On the toy task the exact J is reported
        for whichever is used. evaluator: an ExactEvaluator of that reward already built (shared
        between the runs of a comparison)."""
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("%s: give exactly one of reward_model and reward_fn" % type(self).__name__)
        if cfg.algo not in self.algos:
            raise ValueError("%s runs %s, not algo: %s" % (type(self).__name__, " or ".join(self.algos), cfg.algo))
        self.cfg, self.task, self.log = cfg, task, parallel.main_only(log)
        self.p = p = cfg.section
        self.reward_model, self.reward_fn = reward_model, reward_fn
        self._score = score_function(task, reward_model, reward_fn)
        self.run_dir = run_dir if parallel.is_main() else None   # rank 0 writes the log
        self.device = parallel.init(resolve_device(cfg.device, cfg.algo))
        parallel.check_split(cfg.algo, p, getattr(p, "group_size", 1))
        # bfloat16 is autocast: parameters, gradients and Adam's state stay float32 (README)
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16,  # noqa: E731
                                               enabled=cfg.dtype == "bfloat16")
        self.temperature = cfg.temperature
        parallel.one_at_a_time(lambda: self._build_models(cfg, task))
        self.opt_policy = torch.optim.Adam(self.policy.parameters(), lr=p.lr, **parallel.adam_options(self.policy))
        decay = lambda s: max(0.0, 1.0 - s / p.steps)  # noqa: E731 (linear decay over the run)
        self.sched_policy = torch.optim.lr_scheduler.LambdaLR(self.opt_policy, decay)
        if self.uses_critic:
            self.opt_value = torch.optim.Adam(self.value.parameters(), lr=p.value_lr,
                                              **parallel.adam_options(self.value))
            self.sched_value = torch.optim.lr_scheduler.LambdaLR(self.opt_value, decay)
        self.kl_ctl = KLController(cfg.beta, p.adaptive_kl, p.kl_target, p.kl_horizon)
        self.gen = seed_rngs(cfg.seed)
        if parallel.rank():   # each rank samples its own responses; the prompts and the order agree (self.gen)
            torch.manual_seed(parallel.rank_seed(cfg.seed, 0))
        self.step = 0
        self.history = []
        self.evaluator = evaluator

    def _build_models(self, cfg, task):
        """The policy, its frozen reference and the value model on this rank's device; under
        torchrun sharded with FSDP2 (the reference without gradients, on the CPU with
        ``parallel.offload_reference``)."""
        pc = parallel.options(cfg)
        shard = lambda m, **kw: parallel.shard(m, cfg.dtype, pc.reshard_after_forward, **kw)  # noqa: E731
        policy = task.build_policy(cfg)
        ref = frozen_copy(policy)
        if cfg.gradient_checkpointing:
            enable_checkpointing(policy)
        self.policy = shard(policy.to(self.device), root_inputs=False)
        self.ref = shard(ref if pc.offload_reference and parallel.active() else ref.to(self.device),
                         offload=pc.offload_reference, root_inputs=False)
        if self.uses_critic:
            value = task.build_value(cfg)
            if cfg.gradient_checkpointing:
                enable_checkpointing(value.backbone)
            self.value = shard(value.to(self.device))

    @property
    def total_steps(self):
        return self.p.steps

    # ---------- exact evaluation on the toy task ----------
    def evaluate(self):
        """Exact J of the current policy, J*, the policy's mean hidden-rule reward and its KL.
        J is defined with the configured beta (the initial one if adaptive)."""
        if self.evaluator is None:
            self.evaluator = ExactEvaluator(self.task, self.ref, self._score, self.cfg.beta)
        res = self.evaluator.evaluate(self.policy)
        return {k: res[k] for k in ("J", "J_star", "J_rule", "exact_kl")}

    # ---------- one PPO step ----------
    _sequences = staticmethod(sequences)

    def _logprobs(self, model, prompts, responses, mask, with_entropy=False):
        """log-probabilities (and entropies) of the response tokens under ``model``: [B, L]."""
        with self.autocast():
            return response_logprobs(model, prompts, responses, mask, temperature=self.temperature,
                                     fused_lm_head=self.p.fused_lm_head, with_entropy=with_entropy, ops=self.ops)

    def _values(self, prompts, responses, mask):
        with self.autocast():
            return self.value(*self._sequences(prompts, responses, mask))[:, prompts.shape[1] - 1:-1].float()

    def sample_prompts(self):
        return torch.randint(0, self.task.num_prompts, (self.p.rollout_batch,), generator=self.gen)

    def rollout(self):
        """This rank's share of the rollout: every rank draws the same prompts (self.gen) and
        answers its contiguous slice of them (whole groups for the group algorithms)."""
        prompt_ids = self.sample_prompts()
        prompts = self.task.prompts[prompt_ids]
        prompts = prompts[:, (prompts != PROMPT_PAD).any(0)]    # no column of left padding only
        mine = parallel.share(len(prompt_ids), "%s.rollout_batch" % self.cfg.algo)
        prompt_ids, prompts = prompt_ids[mine], prompts[mine].to(self.device)
        with self.autocast(), _eval_mode(self.policy, self.cfg.gradient_checkpointing):
            responses = generate(self.policy, prompts, self.task.cfg, self.temperature, self.task.top_p)
        return prompt_ids, prompts, responses

    def _chunked(self, fn, prompts, responses, mask):
        """fn over the rollout in micro-batches: the same split as the first epoch, so the
        first ratios are exactly 1."""
        mb = self.p.micro_batch
        return torch.cat([fn(prompts[i:i + mb], responses[i:i + mb], mask[i:i + mb])
                          for i in range(0, len(prompts), mb)])

    def _score_with_penalty(self, prompt_ids, responses):
        """The reward's score of each response (with the missing-EOS penalty) and whether it has EOS."""
        tc = self.task.cfg
        with self.autocast():
            try:
                score = self._score(prompt_ids, responses).float()
            except RewardFunctionError as e:   # the reward function knows its batch; the step is ours
                e.step = self.step + 1
                raise
        has_eos = is_eos(responses, tc.eos_token_id).any(-1)
        if tc.stop_at_eos and self.p.missing_eos_penalty is not None:
            score = score + torch.where(has_eos, 0.0, self.p.missing_eos_penalty)
        return score, has_eos

    def score_rollout(self, prompt_ids, prompts, responses):
        p, tc = self.p, self.task.cfg
        mask = response_mask(responses, tc.eos_token_id, tc.stop_at_eos)

        def chunked(fn):
            return self._chunked(fn, prompts, responses, mask)

        with torch.no_grad():
            old_logp = chunked(lambda *a: self._logprobs(self.policy, *a))
            ref_logp = chunked(lambda *a: self._logprobs(self.ref, *a))
            old_values = chunked(self._values)
            score, has_eos = self._score_with_penalty(prompt_ids, responses)
            kl = self.ops.kl_penalty(old_logp, ref_logp, p.kl_estimator) * mask
            rewards = -self.kl_ctl.beta * kl
            last = mask.long().sum(-1) - 1                      # the last real response token
            rewards[torch.arange(len(last), device=last.device), last] += score
            adv, returns = self.ops.gae(rewards, old_values, mask, gamma=p.gamma, lam=p.lam)
            if p.whiten_advantages:   # over every rank's tokens under torchrun
                group = parallel.group()
                adv = self.ops.masked_whiten(adv, mask, **({"process_group": group} if group is not None else {}))
        return {"prompt_ids": prompt_ids, "prompts": prompts, "responses": responses, "mask": mask,
                "rewards": rewards, "old_logp": old_logp, "ref_logp": ref_logp, "old_values": old_values, "score": score,
                "kl": kl, "advantages": adv, "returns": returns, "has_eos": has_eos}

    def micro_loss(self, batch, j, num_tokens):
        """The loss of the micro-batch ``j`` (rows of the rollout) before the accumulation scale,
        its log-probabilities, and its statistics (0-d tensors; None where not applicable)."""
        p = self.p
        mask = batch["mask"][j]
        ppo_kw = dict(clip_low=p.clip_low, clip_high=p.clip_high, dual_clip=p.dual_clip, loss_agg=p.loss_agg,
                      num_tokens=num_tokens)
        if p.fused_lm_head and (p.loss_agg == "token-mean" or p.entropy_coef == 0):
            # hidden states straight to the loss: linear_policy_loss makes the LM head's gradients in
            # its forward (no [B, L, V] logits, 6NHV). Its entropy term is aggregated like the policy
            # loss, which equals this trainer's (token-mean over num_tokens) under token-mean only.
            def fused(model):
                hidden, weight, bias = response_hidden(model, batch["prompts"][j], batch["responses"][j], mask)
                return self.ops.linear_policy_loss(hidden, weight, batch["responses"][j], batch["old_logp"][j],
                                                   batch["advantages"][j], mask, bias=bias,
                                                   temperature=self.temperature, entropy_coef=p.entropy_coef,
                                                   **ppo_kw)
            with self.autocast():
                loss, st = root_call(self.policy, fused)
            logp = st["logprobs"]
            ent = st["entropy"] * (mask.sum() / num_tokens)  # sum of the valid entropies / num_tokens
            pg = loss + p.entropy_coef * ent
        else:
            logp, entropy = self._logprobs(self.policy, batch["prompts"][j], batch["responses"][j], mask,
                                           with_entropy=True)
            pg, st = self.ops.ppo_policy_loss(logp, batch["old_logp"][j], batch["advantages"][j], mask, **ppo_kw)
            ent = (entropy * mask).sum() / num_tokens
            loss = pg - p.entropy_coef * ent
        out = {"policy_loss": pg, "entropy": ent, "st": st, "value_loss": None, "vst": None}
        if self.uses_critic:
            values = self._values(batch["prompts"][j], batch["responses"][j], mask)
            vf, vst = self.ops.ppo_value_loss(values, batch["old_values"][j], batch["returns"][j], mask,
                                        clip=p.value_clip, loss_agg=p.loss_agg, num_tokens=num_tokens)
            loss = loss + vf
            out.update(value_loss=vf, vst=vst)
        return loss, logp, out

    def _optimizers(self):
        return [(self.opt_policy, self.policy)] + ([(self.opt_value, self.value)] if self.uses_critic else [])

    def update(self, batch):
        p = self.p
        n = p.rollout_batch
        acc = {k: [] for k in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "ratio_mean", "vf_clipfrac",
                               "explained_var", "entropy")}
        ratio_max, ratio_min, first_dev = -math.inf, math.inf, None
        opts = self._optimizers()
        # every rank holds the whole experience batch and takes its contiguous share of each minibatch
        share = parallel.share(p.minibatch, "%s.minibatch" % self.cfg.algo)
        for epoch in range(p.epochs):
            # the rollout order is already random (prompts are sampled); later epochs reshuffle
            order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=self.gen)
            for s in range(0, n, p.minibatch):
                idx = order[s:s + p.minibatch]
                num_tokens = batch["mask"][idx].sum()             # global normalizer of the minibatch
                for opt, _ in opts:
                    opt.zero_grad()
                mine = idx[share]
                for m0 in range(0, len(mine), p.micro_batch):
                    j = mine[m0:m0 + p.micro_batch]
                    mask = batch["mask"][j]
                    loss, logp, o = self.micro_loss(batch, j, num_tokens)
                    if p.loss_agg not in ("token-mean", "token-sum"):
                        # the per-sequence modes are means over the micro-batch's rows: weight each
                        # micro-batch by its share of the minibatch so the sum is the minibatch's mean
                        loss = loss * (len(j) / p.minibatch)
                    loss.backward()
                    if epoch == 0 and s == 0:   # the first minibatch: the policy has not moved yet
                        dev = (torch.exp(logp.detach() - batch["old_logp"][j])[mask] - 1).abs().max().item()
                        first_dev = dev if first_dev is None else max(first_dev, dev)
                    w = mask.sum().item() / max(num_tokens.item(), 1)
                    scale = 1.0 if p.loss_agg in ("token-mean", "token-sum") else len(j) / p.minibatch
                    st = o["st"]
                    acc["policy_loss"].append(o["policy_loss"].item() * scale)
                    acc["entropy"].append(o["entropy"].item())
                    for k in ("approx_kl", "clipfrac", "ratio_mean"):
                        acc[k].append(st[k].item() * w)
                    if o["vst"] is not None:
                        acc["value_loss"].append(o["value_loss"].item() * scale)
                        acc["vf_clipfrac"].append(o["vst"]["vf_clipfrac"].item() * w)
                        acc["explained_var"].append(o["vst"]["explained_var"].item())
                    ratio_max = max(ratio_max, st["ratio_max"].item())
                    ratio_min = min(ratio_min, st["ratio_min"].item())
                for opt, model in opts:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), p.max_grad_norm)
                for opt, _ in opts:
                    opt.step()
        steps = p.epochs * (n // p.minibatch)
        # each rank's sums are its share of the minibatches' (weights over the global token counts)
        keys = ("approx_kl", "clipfrac", "ratio_mean", "policy_loss", "entropy") + (
            ("value_loss", "vf_clipfrac", "explained_var") if self.uses_critic else ())
        tot = dict(zip(keys + ("n_ev",), parallel.all_sum([sum(acc[k]) for k in keys] + [len(acc["explained_var"])])))
        ratio_max, neg_min, first_dev = parallel.all_max([ratio_max, -ratio_min, first_dev])
        out = {k: tot[k] / steps for k in keys if k != "explained_var"}
        if self.uses_critic:
            out["explained_var"] = tot["explained_var"] / tot["n_ev"]
        else:
            out.update(value_loss=None, vf_clipfrac=None, explained_var=None)
        out.update(ratio_max=ratio_max, ratio_min=-neg_min, first_ratio_max_dev=first_dev)
        return out

    @staticmethod
    def gather(batch):
        """Under torchrun every rank's rows of the scored rollout (rank order), so the update's order,
        its token counts and the logged statistics are those of the whole batch; else ``batch``."""
        if parallel.world() == 1:
            return batch
        return {k: parallel.gather_rows(v) if torch.is_tensor(v) else v for k, v in batch.items()}

    @property
    def kl_estimator(self):
        return self.p.kl_estimator

    def train_step(self, evaluate=False):
        p = self.p
        t0 = time.perf_counter()
        prompt_ids, prompts, responses = self.rollout()
        t1 = time.perf_counter()
        batch = self.gather(self.score_rollout(prompt_ids, prompts, responses))
        prompt_ids, responses = batch["prompt_ids"], batch["responses"]
        t2 = time.perf_counter()
        beta_used = self.kl_ctl.beta
        stats = self.update(batch)
        self.sched_policy.step()
        if self.uses_critic:
            self.sched_value.step()
        t3 = time.perf_counter()
        mask = batch["mask"]
        kl_seq = batch["kl"].sum(-1).mean().item()
        self.kl_ctl.update(kl_seq, p.rollout_batch)
        self.step += 1
        ev = self.evaluate() if evaluate else {"J": None, "J_star": None, "J_rule": None, "exact_kl": None}
        rule = self.task.rule_reward(prompt_ids, responses)     # None: no hidden rule (real prompts)
        t4 = time.perf_counter()
        row = {
            "step": self.step,
            "score_mean": batch["score"].mean().item(), "score_std": batch["score"].std().item(),
            "rule_reward_mean": None if rule is None else rule.mean().item(),
            "kl_seq_sum": kl_seq, "kl_token_mean": (batch["kl"].sum() / mask.sum()).item(),
            "kl_estimator": self.kl_estimator, "beta": beta_used,
            "entropy": stats["entropy"], "approx_kl": stats["approx_kl"], "clipfrac": stats["clipfrac"],
            "ratio_mean": stats["ratio_mean"], "ratio_max": stats["ratio_max"], "ratio_min": stats["ratio_min"],
            "first_ratio_max_dev": stats["first_ratio_max_dev"],
            "policy_loss": stats["policy_loss"], "value_loss": stats["value_loss"],
            "vf_clipfrac": stats["vf_clipfrac"], "explained_var": stats["explained_var"],
            "response_length": mask.sum(-1).float().mean().item(),
            "eos_rate": batch["has_eos"].float().mean().item(), "lr": self.sched_policy.get_last_lr()[0],
            **ev,
            "time_rollout": t1 - t0, "time_score": t2 - t1, "time_update": t3 - t2, "time_eval": t4 - t3,
            "time_step": t4 - t0,
        }
        assert list(row) == LOG_KEYS
        if parallel.is_main() and row["approx_kl"] > p.approx_kl_warn:
            warnings.warn("step %d: approx_kl %.3f > %.3f: the policy moves too far per step (lower the lr or "
                          "the epochs)" % (self.step, row["approx_kl"], p.approx_kl_warn), RuntimeWarning)
        if parallel.is_main() and row["kl_seq_sum"] > p.kl_warn:
            warnings.warn("step %d: KL to the reference %.2f per sequence > %.2f: raise beta or use the adaptive "
                          "controller" % (self.step, row["kl_seq_sum"], p.kl_warn), RuntimeWarning)
        self.history.append(row)
        if self.run_dir:
            with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    # ---------- checkpoints ----------
    def state_dict(self):
        s = {
            "step": self.step, "policy": self.policy.state_dict(), "opt_policy": self.opt_policy.state_dict(),
            "sched_policy": self.sched_policy.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(), "history": self.history, "config": self.cfg.to_dict(),
            **rng_state(self.gen, self.device),
        }
        if self.uses_critic:
            s.update(value=self.value.state_dict(), opt_value=self.opt_value.state_dict(),
                     sched_value=self.sched_value.state_dict())
        return s

    def save(self, path):
        """checkpoint.pt in one process; under torchrun a sharded checkpoint folder (``dist_checkpoint``)."""
        if parallel.active():
            from rlhf_trainer import dist_checkpoint
            return dist_checkpoint.save(self, path)
        save_checkpoint(self.state_dict(), path)

    def load(self, path):
        from rlhf_trainer import dist_checkpoint
        if os.path.isdir(path) or parallel.active():   # a sharded checkpoint, or one to shard
            return dist_checkpoint.load(self, path)
        s = torch.load(path, weights_only=False, map_location="cpu")
        from rlhf_trainer.rundir import same_run, steps_key
        if not same_run(s["config"], self.cfg.to_dict(), steps_key(self.cfg)):   # more steps: an extended run
            raise ValueError("checkpoint %s was written with another configuration" % path)
        self.step = s["step"]
        self.policy.load_state_dict(s["policy"])
        self.opt_policy.load_state_dict(s["opt_policy"])
        self.sched_policy.load_state_dict(s["sched_policy"])
        if self.uses_critic:
            self.value.load_state_dict(s["value"])
            self.opt_value.load_state_dict(s["opt_value"])
            self.sched_value.load_state_dict(s["sched_value"])
        self.kl_ctl.load_state_dict(s["kl_ctl"])
        set_rng_state(self.gen, s, self.device)
        self.history = s["history"]
        rewrite_log(self.run_dir, self.history)
