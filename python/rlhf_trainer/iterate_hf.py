"""Iterated RLHF on real models: ``rlhf_trainer train`` with an ``iterate:`` section.

The reward model is trained in the run, by ``rlhf_trainer rm``'s own code (``rm.run``): reward
model 1 from ``rm.model`` on ``rm.data`` (the initial preference pairs). Round k (k = 1 .. rounds):
  1. train the policy against reward model k (plus ``reward.fn``, when given, as in a plain run) for
     the algorithm's ``steps``: round 1 is exactly ``rlhf_trainer train`` with ``reward.model:
     rm_1/model``; later rounds continue from the previous round's policy, with a fresh optimizer,
     schedule and value model, against the same reference (the initial policy);
  2. draw ``comparisons_per_round`` prompts uniformly from ``data.prompts`` and sample two responses
     to each from the policy, in batches of ``rollout_batch`` responses; label each batch's pairs with
     ``iterate.labeler`` (``label``) and write them to ``round_<k>/pairs.jsonl`` in rm.data's format;
  3. log (``ROUND_KEYS``): reward model k's mean score on those responses (the proxy reward), its
     pairwise accuracy on the labelled pairs (before it is retrained: how well it judges the policy's
     own distribution; pairs of identical responses left out), on the initial data (``rm.eval_data``,
     else ``rm.data``), and ``iterate.true_reward``'s mean on the responses when it is given (real
     models have no exact J and no true reward but the one a user supplies);
  4. unless it is the last round: reward model k + 1 = ``rm.run`` on rm.data and every round's pairs
     so far (``rm_<k+1>/data.jsonl``), from ``rm.model`` (``rm_update: scratch``) or from reward model
     k (``finetune``).

Writes into the run directory: config.yaml, ``rm_<k>/`` (what ``rlhf_trainer rm`` writes: model/,
log.jsonl, summary.json, config.yaml), ``round_<k>/`` (log.jsonl in the schema of ``ppo.LOG_KEYS``,
curves.png, pairs.jsonl), ``rounds.jsonl`` (one line per round), summary.json, and the final policy
with its tokenizer in ``policy/``. Not checkpointed: ``--resume`` is refused.
"""

import copy
import json
import os
import time

import torch

from rlhf_trainer.config import ConfigError, InputError

# one line of rounds.jsonl per round, these keys
ROUND_KEYS = ["round", "comparisons", "score_start", "score_end", "kl_seq_sum", "proxy_reward", "true_reward",
              "rm_accuracy_policy", "policy_pairs", "rm_accuracy_initial", "labeler_mean", "rm_s", "train_s",
              "sample_s"]


def label(fn, name, prompts, responses_a, responses_b, batch, gen):
    """The labeler's verdict on each pair, checked -> (a preferred [n] bool, its numbers [n] float64).

    fn(prompts, responses_a, responses_b) gets the prompts as in data.prompts and the two decoded
    responses to each, and returns one number in [0, 1] per pair: 1 (or True) prefers a, 0 (False)
    b, a number between is the probability that a is preferred, drawn from ``gen``. An exception
    raised inside fn keeps its traceback, with a note naming iterate.labeler and the batch."""
    where = "iterate.labeler %s on batch %s (%d pairs)" % (name, batch, len(prompts))
    try:
        out = fn(prompts, responses_a, responses_b)
    except Exception as e:
        e.add_note("raised in %s" % where)
        raise
    want = ("one number in [0, 1] per pair (1: the first response preferred, 0: the second, between: the "
            "probability of the first)")
    try:
        p = torch.as_tensor(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InputError("%s returned %s, not numbers: it must return %s" % (where, repr(out)[:80], want)) from None
    if p.shape != (len(prompts),):
        raise InputError("%s returned shape %s: it must return %s, shape (%d,)"
                         % (where, tuple(p.shape), want, len(prompts)))
    bad = (~((p >= 0) & (p <= 1))).nonzero()   # NaN included
    if len(bad):
        i = bad[0].item()
        raise InputError("%s returned %s for pair %d: it must return %s" % (where, p[i].item(), i, want))
    return torch.rand(len(p), generator=gen, dtype=torch.float64) < p, p


def sample_pairs(trainer, task, reward, it, k, fns, gen):
    """comparisons_per_round pairs from the trainer's policy, labelled, in batches of rollout_batch
    responses -> (rm.data lines, the round's measurements)."""
    from rlhf_trainer.hf import Reward, call_reward_fn
    from rlhf_trainer.sequences import PROMPT_PAD, _eval_mode, generate
    cfg = trainer.cfg
    labeler, true_fn = fns
    proxy = Reward(task, reward_model=reward.model, rm_tokenizer=reward.rm_tokenizer, micro_batch=reward.micro_batch)
    per = max(1, cfg.section.rollout_batch // 2)
    lines, scores, true, numbers, right, untied = [], [], [], [], 0, 0
    for b, start in enumerate(range(0, it.comparisons_per_round, per), 1):
        pid = torch.randint(0, task.num_prompts, (min(per, it.comparisons_per_round - start),), generator=gen)
        n, ids = len(pid), pid.repeat(2)
        prompts = task.prompts[ids]
        prompts = prompts[:, (prompts != PROMPT_PAD).any(0)].to(trainer.device)
        with trainer.autocast(), _eval_mode(trainer.policy, cfg.gradient_checkpointing):
            responses = generate(trainer.policy, prompts, task.cfg, cfg.temperature, task.top_p)
        texts_p, texts = task.decode(ids, responses)
        batch = "%d of round %d" % (b, k)
        a_wins, p = label(labeler, it.labeler, texts_p[:n], texts[:n], texts[n:], batch, gen)
        s = proxy(ids, responses).double().cpu()
        scores.append(s)
        numbers.append(p)
        if true_fn is not None:
            true.append(call_reward_fn(true_fn, it.true_reward, texts_p, texts, batch, key="iterate.true_reward"))
        differ = torch.tensor([x != y for x, y in zip(texts[:n], texts[n:])], dtype=torch.bool)
        ordered = torch.where(a_wins, s[:n] > s[n:], s[n:] > s[:n])
        right, untied = right + int((ordered & differ).sum()), untied + int(differ.sum())
        for i in range(n):
            win, lose = (texts[i], texts[n + i]) if a_wins[i] else (texts[n + i], texts[i])
            lines.append(json.dumps({"prompt": texts_p[i], "chosen": win, "rejected": lose}) + "\n")
    return lines, {"proxy_reward": torch.cat(scores).mean().item(),
                   "true_reward": torch.cat(true).mean().item() if true else None,
                   "rm_accuracy_policy": right / untied if untied else None, "policy_pairs": untied,
                   "labeler_mean": torch.cat(numbers).mean().item()}


def fit_reward_model(cfg, k, data, init, run_dir, log, progress):
    """Reward model k: ``rm.run`` (the ``rlhf_trainer rm`` command's training) on ``data`` from ``init``,
    into run_dir/rm_<k>; its held-out accuracy is on the initial data. -> (its summary, its folder)."""
    from rlhf_trainer import rm
    c = copy.deepcopy(cfg)
    c.rm.data, c.rm.model, c.rm.eval_data = data, init, cfg.rm.eval_data or cfg.rm.data
    rm_dir = os.path.join(run_dir, "rm_%d" % k)
    os.makedirs(rm_dir, exist_ok=True)
    return rm.run(c, rm_dir, log=log, progress=progress), rm_dir


def write_pool(files, path):
    """The files' lines, in order, into path (the pooled data of the next reward model); -> path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for name in files:
            with open(name, encoding="utf-8") as f:
                text = f.read()
            out.write(text if text.endswith("\n") else text + "\n")
    return path


def _check_pairs(c):
    """rm.data (and rm.eval_data) must hold pairs: the labelled pairs are pooled with them."""
    from rlhf_trainer.rm import KINDS, read_preferences
    for key, path in (("rm.data", c.data), ("rm.eval_data", c.eval_data)):
        if path is not None:
            kind = read_preferences(path, key, c)[2]
            if kind != "bt":
                raise InputError("%s: %s holds %s; an iterated run pools the labeler's pairs with it, so it must "
                                 "hold pairs ({\"prompt\", \"chosen\", \"rejected\"} lines)"
                                 % (key, path, KINDS[kind][1]))


def run(cfg, run_dir, log=print, progress=True, config_dir=None):
    """Iterated RLHF on real models into run_dir; returns (the summary, also summary.json, and the rounds' rows)."""
    from tqdm import tqdm

    from rlhf_trainer import hf
    from rlhf_trainer.algos import trainer_class
    from rlhf_trainer.plot import plot_run
    from rlhf_trainer.runstate import seed_rngs
    from rlhf_trainer.train import check, oom_message
    if cfg.iterate is None:
        raise ConfigError("iterate: iterate_hf.run needs an iterate section")
    t0 = time.perf_counter()
    device = check(cfg)
    it, c = cfg.iterate, cfg.rm
    task, pieces = hf.prepare(cfg, config_dir, log)
    fns = (hf.import_reward_fn(it.labeler, config_dir, "iterate.labeler"),
           hf.import_reward_fn(it.true_reward, config_dir, "iterate.true_reward") if it.true_reward else None)
    hf.resolve_model("rm.model", c.model)
    _check_pairs(c)
    os.makedirs(run_dir, exist_ok=True)
    cfg.save(os.path.join(run_dir, "config.yaml"))
    log(cfg.accounting() + "; device %s, %s; iterated: %d rounds, %d comparisons per round, reward model %s"
        % (device, cfg.dtype, it.rounds, it.comparisons_per_round,
           "retrained from rm.model" if it.rm_update == "scratch" else "fine-tuned"))
    gen = torch.Generator().manual_seed(cfg.seed + 29)   # the pairs' prompts and the labels' draws
    t_rm = time.perf_counter()
    rm_summary, rm_dir = fit_reward_model(cfg, 1, c.data, c.model, run_dir, log, progress)
    rm_s = time.perf_counter() - t_rm
    rows, policy_state, pool, samples = [], None, [c.data], 0
    for k in range(1, it.rounds + 1):
        reward = hf.build_reward(cfg, task, dict(pieces, rm_path=os.path.join(rm_dir, "model")), device, log)
        round_dir = os.path.join(run_dir, "round_%d" % k)
        os.makedirs(round_dir, exist_ok=True)
        trainer = trainer_class(cfg.algo)(cfg, task, reward_fn=reward, run_dir=round_dir, log=log)
        if policy_state is not None:
            trainer.policy.load_state_dict(policy_state)
            trainer.gen = seed_rngs(cfg.seed + 1000 * (k - 1))
        open(os.path.join(round_dir, "log.jsonl"), "w").close()
        bar = tqdm(total=trainer.total_steps, disable=not progress, desc="%s round %d" % (cfg.algo, k), unit="step")
        while trainer.step < trainer.total_steps:
            try:
                trainer.train_step(evaluate=False)
            except torch.cuda.OutOfMemoryError:
                raise InputError(oom_message(cfg, task, trainer.step + 1)) from None
            bar.update(1)
        bar.close()
        plot_run(round_dir)
        samples += trainer.step * cfg.section.rollout_batch
        h = trainer.history
        t_sample = time.perf_counter()
        lines, measured = sample_pairs(trainer, task, reward, it, k, fns, gen)
        pairs = os.path.join(round_dir, "pairs.jsonl")
        with open(pairs, "w") as f:
            f.writelines(lines)
        row = {"round": k, "comparisons": rm_summary["comparisons"], "score_start": h[0]["score_mean"],
               "score_end": h[-1]["score_mean"], "kl_seq_sum": h[-1]["kl_seq_sum"], **measured,
               "rm_accuracy_initial": rm_summary["eval_accuracy"], "rm_s": rm_s,
               "train_s": sum(r["time_step"] for r in h), "sample_s": time.perf_counter() - t_sample}
        row = {key: row[key] for key in ROUND_KEYS}
        rows.append(row)
        with open(os.path.join(run_dir, "rounds.jsonl"), "a" if k > 1 else "w") as f:
            f.write(json.dumps(row) + "\n")
        log("round %d: score %.3f -> %.3f, KL per sequence %.3f; proxy reward %.3f%s; reward model accuracy %s on "
            "the policy's pairs, %.3f on the initial data"
            % (k, row["score_start"], row["score_end"], row["kl_seq_sum"], row["proxy_reward"],
               "" if row["true_reward"] is None else ", true reward %.3f" % row["true_reward"],
               "-" if row["rm_accuracy_policy"] is None else "%.3f" % row["rm_accuracy_policy"],
               row["rm_accuracy_initial"]))
        if k == it.rounds:
            break
        policy_state = {name: v.detach().cpu().clone() for name, v in trainer.policy.state_dict().items()}
        del trainer, reward
        pool.append(pairs)
        data = write_pool(pool, os.path.join(run_dir, "rm_%d" % (k + 1), "data.jsonl"))
        t_rm = time.perf_counter()
        rm_summary, rm_dir = fit_reward_model(cfg, k + 1, data, c.model if it.rm_update == "scratch"
                                              else os.path.join(rm_dir, "model"), run_dir, log, progress)
        rm_s = time.perf_counter() - t_rm
    policy_dir = os.path.join(run_dir, "policy")
    trainer.policy.save_pretrained(policy_dir)
    task.tokenizer.save_pretrained(policy_dir)
    summary = {"algo": cfg.algo, "rounds": it.rounds, "rm_update": it.rm_update, "comparisons": rows[-1]["comparisons"],
               "initial_data": c.eval_data or c.data, "proxy_reward_first": rows[0]["proxy_reward"],
               "proxy_reward_end": rows[-1]["proxy_reward"], "true_reward_first": rows[0]["true_reward"],
               "true_reward_end": rows[-1]["true_reward"], "samples_drawn": samples, "device": str(device),
               "dtype": cfg.dtype, "wall_s": time.perf_counter() - t0, "policy": policy_dir}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary, rows


def print_table(rows, run_dir):
    def f(x):
        return "-" if x is None else "%.3f" % x
    print("\n| round | comparisons | score (train) | proxy reward | true reward | RM accuracy: policy's pairs | "
          "initial data | KL per sequence |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %d | %d | %.3f -> %.3f | %.3f | %s | %s | %.3f | %.3f |" % (
            r["round"], r["comparisons"], r["score_start"], r["score_end"], r["proxy_reward"], f(r["true_reward"]),
            f(r["rm_accuracy_policy"]), r["rm_accuracy_initial"], r["kl_seq_sum"]))
    print("run directory: %s" % run_dir)
