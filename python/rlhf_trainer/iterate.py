"""Iterated RLHF on the toy task (a config with an ``iterate:`` section, run by ``rlhf_trainer demo``).

Round k (k = 1 .. iterate.rounds):
  1. train the policy against reward model k for the algorithm's ``steps`` (round 1: the demo's
     run, the same numbers; later rounds continue from the previous round's policy, with a fresh
     optimizer and learning-rate schedule, and the same reference pi_ref);
  2. measure, exactly, the policy's J (with reward model k's r), its hidden-rule ("true") reward, its
     reward-model ("proxy") reward E_pi[r], its KL to pi_ref, and the hidden-rule reward of reward
     model k's own exact optimum pi* = pi_ref exp(r / beta) / Z (the most any amount of training on
     that reward model can reach at this beta); and reward model k's pairwise accuracy on pairs drawn
     from the policy (the distribution it now has to judge) and on the initial held-out comparisons;
  3. unless it is the last round: draw ``comparisons_per_round`` pairs of responses from the policy,
     label them (the hidden rule with Bradley-Terry noise, ``IterateSection``), pool them with every
     earlier comparison, the initial ones included, and train reward model k + 1 on the pool, from
     its initialization or from reward model k (``rm_update``).

Proxy rewards are on one scale across rounds: every reward model is standardized on the responses
of the initial training comparisons, as the first one is (``reward.train_reward_model``).

Writes into the run directory: the demo's files for round 1's reward model (``reward_model.pt``),
``round_<k>/log.jsonl`` (the per-step log of round k, the demo's schema), ``rounds.jsonl`` (one line
per round, ``ROUND_KEYS``), ``summary.json``.
"""

import copy
import json
import os
import time

import torch
from tqdm import tqdm

import rlhf_kernels as rk

# one line of rounds.jsonl per round, these keys
ROUND_KEYS = ["round", "comparisons", "J_start", "exact_kl_start", "J", "J_star", "J_rule", "J_rule_star",
              "proxy_reward", "exact_kl", "rm_accuracy_policy", "policy_pairs", "rm_accuracy_initial", "rm_s", "train_s"]


def initial_comparisons(task, rc, seed):
    """The first reward model's training and held-out comparisons, drawn exactly as
    ``reward.train_reward_model`` draws them (its generator, seed + 17, in its order)."""
    from rlhf_trainer.reward import make_comparisons
    gen = torch.Generator().manual_seed(seed + 17)
    train = make_comparisons(task, rc, rc.num_train, gen)
    held_out = make_comparisons(task, rc, rc.num_eval, gen)
    return train, held_out


def as_pairs(prompt_ids, responses, valid):
    """Rankings [n, K, L] best first (valid [n, K]) -> every valid ordered pair as
    (prompt ids [m], chosen [m, L], rejected [m, L])."""
    K = responses.shape[1]
    pid, chosen, rejected = [], [], []
    for i in range(K):
        for j in range(i + 1, K):
            both = valid[:, i] & valid[:, j]
            pid.append(prompt_ids[both])
            chosen.append(responses[both, i])
            rejected.append(responses[both, j])
    return torch.cat(pid), torch.cat(chosen), torch.cat(rejected)


def sample_pairs(policy, task, n, temperature, gen):
    """n prompts drawn uniformly, each answered twice by the policy: (prompt ids [n], a [n, L], b [n, L])."""
    from rlhf_trainer.sequences import generate
    pid = torch.randint(0, task.num_prompts, (n,), generator=gen)
    device = next(policy.parameters()).device
    responses = generate(policy, task.prompts[pid.repeat(2)].to(device), task.cfg, temperature, task.top_p).cpu()
    return pid, responses[:n], responses[n:]


def label_pairs(task, pid, a, b, noise, gen):
    """The toy labeler: a preferred over b with probability sigmoid((n_a - n_b) / noise), n the number
    of rule-following tokens (noise 0: the rule's order, ties a coin flip). -> (chosen, rejected)."""
    L = task.cfg.response_len
    diff = (task.rule_reward(pid, a) - task.rule_reward(pid, b)) * L
    if noise > 0:
        p_a = torch.sigmoid(diff / noise)
    else:
        p_a = (diff > 0).double() + 0.5 * (diff == 0).double()
    a_wins = torch.rand(len(pid), generator=gen, dtype=torch.float64) < p_a
    return torch.where(a_wins[:, None], a, b), torch.where(a_wins[:, None], b, a)


def _pair_scores(model, task, pid, a, b):
    from rlhf_trainer.reward import _scores
    with torch.no_grad():
        s = _scores(model, task, pid, torch.stack([a, b], 1)).cpu()
    return s[:, 0], s[:, 1]


def policy_accuracy(model, task, pid, a, b):
    """The reward model's pairwise accuracy on pairs drawn from a policy, against the rule itself (no
    label noise), ties left out: (accuracy or None when every pair is a tie, number of untied pairs)."""
    diff = task.rule_reward(pid, a) - task.rule_reward(pid, b)
    untied = diff != 0
    if not untied.any():
        return None, 0
    s_a, s_b = _pair_scores(model, task, pid[untied], a[untied], b[untied])
    right = ((s_a > s_b) == (diff[untied] > 0)).sum().item()
    return right / int(untied.sum()), int(untied.sum())


def fit_reward_model(task, cfg, pool, scale_on, gen, device, init=None):
    """A reward model trained with ``rk.bt_loss`` on the pooled pairs (prompt ids, chosen, rejected)
    for reward_model.steps minibatches, from its initialization or from ``init``'s weights, then
    standardized on the responses ``scale_on`` (prompt ids [m], responses [m, K, L], valid [m, K])."""
    from rlhf_trainer.models import ScalarHeadModel
    from rlhf_trainer.reward import _scores
    rc = cfg.reward_model
    model = ScalarHeadModel(cfg.model, cfg.task, seed_offset=2)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.to(device).train().requires_grad_(True)
    pid, chosen, rejected = pool
    opt = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / rc.steps)
    for _ in range(rc.steps):
        idx = torch.randint(0, len(pid), (min(rc.batch_size, len(pid)),), generator=gen)
        s = _scores(model, task, pid[idx], torch.stack([chosen[idx], rejected[idx]], 1))
        loss, _ = rk.bt_loss(s[:, 0], s[:, 1], label_smoothing=rc.label_smoothing, center_coef=rc.center_coef)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        s = _scores(model, task, scale_on[0], scale_on[1])[scale_on[2].to(device)]
    model.standardize_(s.mean(), s.std())
    return model


def run(cfg, run_dir, log=print, progress=True, on_round=None, initial=None):
    """Iterated RLHF on the toy task into run_dir; returns (the summary, also summary.json, and the
    rounds' rows). on_round(row, evaluator): called after each round with its row and the exact
    evaluator of its reward model (``overopt`` draws each reward model's exact curve from it).
    initial: (reward model, its metrics, its training and held-out comparisons as make_comparisons
    gives them) to start from instead of the configured one (``overopt``'s biased proxy)."""
    from rlhf_trainer.demo import make_trainer, reward_model
    from rlhf_trainer.models import build_policy, frozen_copy
    from rlhf_trainer.runstate import seed_rngs
    from rlhf_trainer.sequences import score_function
    from rlhf_trainer.reward import pairwise_accuracy
    from rlhf_trainer.toy import ExactEvaluator, ToyTask, all_response_logprobs
    t0 = time.perf_counter()
    it, rc = cfg.iterate, cfg.reward_model
    os.makedirs(run_dir, exist_ok=True)
    cfg.save(os.path.join(run_dir, "config.yaml"))
    log(cfg.accounting() + "; iterated: %d rounds, %d comparisons per round, reward model %s"
        % (it.rounds, it.comparisons_per_round, "retrained from scratch" if it.rm_update == "scratch"
           else "fine-tuned"))
    task = ToyTask(cfg.task)
    t_rm = time.perf_counter()
    if initial is None:
        rm, rm_metrics = reward_model(cfg, task, run_dir, log=log)
        train, held_out = initial_comparisons(task, rc, cfg.seed)
    else:
        rm, rm_metrics, train, held_out = initial
    rm_s = time.perf_counter() - t_rm
    pool = as_pairs(*train)
    scale_on = tuple(t[:rc.num_eval] for t in train)      # the responses round 1's model was standardized on
    ref = frozen_copy(build_policy(cfg.model, cfg.task)).to(next(rm.parameters()).device)
    ref_logp = all_response_logprobs(ref, task)
    gen = torch.Generator().manual_seed(cfg.seed + 29)  # pairs, labels and the reward models' minibatches
    rows, policy_state, samples = [], None, 0
    for k in range(1, it.rounds + 1):
        evaluator = ExactEvaluator(task, ref, score_function(task, reward_model=rm), cfg.beta, ref_logp=ref_logp)
        round_dir = os.path.join(run_dir, "round_%d" % k)
        os.makedirs(round_dir, exist_ok=True)
        open(os.path.join(round_dir, "log.jsonl"), "w").close()
        trainer = make_trainer(cfg, task, rm, round_dir, log, evaluator)
        if policy_state is not None:
            trainer.policy.load_state_dict(policy_state)
            trainer.gen = seed_rngs(cfg.seed + 1000 * (k - 1))
        start = trainer.evaluate()
        bar = tqdm(total=trainer.total_steps, disable=not progress, desc="%s round %d" % (cfg.algo, k), unit="step")
        while trainer.step < trainer.total_steps:
            last = trainer.step + 1 == trainer.total_steps
            trainer.train_step(evaluate=last or (trainer.step + 1) % cfg.eval_every == 0)
            bar.update(1)
        bar.close()
        samples += trainer.step * cfg.section.rollout_batch
        train_s = sum(r["time_step"] - r["time_eval"] for r in trainer.history)
        policy = trainer.policy
        exact = evaluator.from_logp(evaluator.policy_logp(policy))
        star = evaluator.from_logp(evaluator.optimal_logp()) if cfg.beta > 0 else evaluator.greedy()
        eval_pairs = sample_pairs(policy, task, rc.num_eval, cfg.temperature, gen)
        acc_policy, n_policy = policy_accuracy(rm, task, *eval_pairs)
        row = {"round": k, "comparisons": len(pool[0]), "J_start": start["J"], "exact_kl_start": start["exact_kl"],
               "J": exact["J"],
               "J_star": exact["J_star"], "J_rule": exact["J_rule"], "J_rule_star": star["J_rule"],
               "proxy_reward": exact["reward"], "exact_kl": exact["exact_kl"], "rm_accuracy_policy": acc_policy,
               "policy_pairs": n_policy, "rm_accuracy_initial": pairwise_accuracy(rm, task, *held_out),
               "rm_s": rm_s, "train_s": train_s}
        assert list(row) == ROUND_KEYS
        rows.append(row)
        if on_round is not None:
            on_round(row, evaluator)
        with open(os.path.join(run_dir, "rounds.jsonl"), "a" if k > 1 else "w") as f:
            f.write(json.dumps(row) + "\n")
        log("round %d: J %.4f (J* %.4f), hidden-rule reward %.3f (%.3f at this reward model's optimum), proxy "
            "reward %.3f, KL %.3f; reward model accuracy %s on the policy's pairs, %.3f on the initial ones"
            % (k, row["J"], row["J_star"], row["J_rule"], row["J_rule_star"], row["proxy_reward"], row["exact_kl"],
               "-" if acc_policy is None else "%.3f" % acc_policy, row["rm_accuracy_initial"]))
        if k == it.rounds:
            break
        policy_state = copy.deepcopy(policy.state_dict())
        t_rm = time.perf_counter()
        pid, a, b = sample_pairs(policy, task, it.comparisons_per_round, cfg.temperature, gen)
        chosen, rejected = label_pairs(task, pid, a, b, it.label_noise, gen)
        pool = tuple(torch.cat([p, q]) for p, q in zip(pool, (pid, chosen, rejected)))
        rm = fit_reward_model(task, cfg, pool, scale_on, gen, next(rm.parameters()).device,
                              init=rm if it.rm_update == "finetune" else None)
        rm_s = time.perf_counter() - t_rm
    summary = {"algo": cfg.algo, "rounds": it.rounds, "rm_update": it.rm_update,
               "rm_accuracy_first": rm_metrics["rm_accuracy"], "J_rule_first": rows[0]["J_rule"],
               "J_rule_star_first": rows[0]["J_rule_star"],
               "J_rule_end": rows[-1]["J_rule"], "kl_end": rows[-1]["exact_kl"], "samples_drawn": samples,
               "comparisons": rows[-1]["comparisons"], "wall_s": time.perf_counter() - t0}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary, rows


def print_table(rows, run_dir):
    print("\n| round | comparisons | J (its reward model) | hidden-rule reward | at that model's optimum | proxy "
          "reward | exact KL | RM accuracy: policy's pairs | initial pairs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %d | %d | %.4f | %.3f | %.3f | %.3f | %.3f | %s | %.3f |" % (
            r["round"], r["comparisons"], r["J"], r["J_rule"], r["J_rule_star"], r["proxy_reward"], r["exact_kl"],
            "-" if r["rm_accuracy_policy"] is None else "%.3f" % r["rm_accuracy_policy"], r["rm_accuracy_initial"]))
    print("run directory: %s" % run_dir)
