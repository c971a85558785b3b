"""`python -m rlhf_trainer.feedback`: reward models from N comparisons against N absolute scores.

On the toy task, for each number N of annotations, each kind of feedback and each seed: a
reward model trained on N comparisons (``bt``) or on N Likert ratings (``regression`` or
``ordinal``), from the same simulated annotator with the same noise (rlhf_trainer/scores.py),
then PPO against it. Everything that matters is computed exactly, by enumerating the
responses of every prompt:

- ``rm_accuracy``: the reward model's pairwise accuracy against the hidden rule over the
  distribution the comparisons are drawn from (two distinct numbers of rule-following tokens,
  uniformly, then a response uniformly among those with each number), exactly: no held-out sample;
- the policy PPO reaches: its true reward E[r] (the hidden rule's), its exact KL to the
  reference, and its exact **true J** = E[r_std] - beta KL, where r_std is the hidden rule on
  the reward models' scale (standardized over the training responses' distribution: mean 1/2,
  sd sqrt(5/36) with three tokens), with the fraction of the true gap J*_true - J(pi_ref) closed;
- the same for pi*, the exact maximizer of J under the reward model (pi_ref exp(r_RM / beta)):
  what a perfect optimizer of that reward model would reach, free of PPO's own error.

Writes ``feedback.csv`` (one row per run), ``feedback.md`` (means over the seeds) and
``feedback.png`` into ``--out``. The defaults are those of docs/feedback.*: one seed, reward models
of ``RM_STEPS`` = 1000 steps of 128 annotations (every loss the same budget), PPO of 25 steps for
N = 1024 only (the 2-core CPU's budget; pi* for every N). 1000 steps, not fewer: a model trained on
ratings learns more slowly than one trained on comparisons, and at 100 steps it had not left its
plateau (regression on 4096 exact ratings: loss 0.21 against 0.28 for a constant, pairwise accuracy
0.71 against 0.96 at 1000 steps), so its accuracy was flat in N whatever the data.
"""

import argparse
import csv
import dataclasses
import os
import time

import torch

COLUMNS = ["feedback", "loss", "n", "seed", "rm_accuracy", "ppo_true_reward", "ppo_kl", "ppo_true_J",
           "ppo_true_gap_closed", "ppo_gap_closed", "opt_true_reward", "opt_kl", "opt_true_J",
           "opt_true_gap_closed", "rm_s", "ppo_s"]
LOSSES = ("bt", "regression", "ordinal")
RM_STEPS = 1000                 # the reward models' default budget (docstring: why not fewer)
FEEDBACK = {"bt": "comparisons", "ranking": "comparisons", "regression": "scores", "ordinal": "scores"}


def exact_accuracy(scores, rule, L):
    """Pairwise accuracy of ``scores`` [n, R] against the hidden rule ``rule`` [n, R] (fractions c/L)
    over uniform pairs of distinct levels a > b and uniform responses within each level: the
    probability that the level-a response scores strictly higher."""
    levels = (rule * L).round().long()
    accs = []
    for s, c in zip(scores.double(), levels):
        by = [s[c == k].sort().values for k in range(L + 1)]
        for a in range(L + 1):
            for b in range(a):
                below = torch.searchsorted(by[b], by[a], right=False)      # level-b scores < each level-a score
                accs.append(below.double().mean() / by[b].numel())
    return torch.stack(accs).mean().item()


def true_objective(ev, logp, L):
    """Exact true reward, KL and true J (the hidden rule on the reward models' scale) of the
    distribution with log-probabilities ``logp`` [n, R]."""
    mean, sd = 0.5, ((L + 2) / (12 * L)) ** 0.5      # of c/L, c uniform over 0..L
    p = logp.double().exp()
    reward = (p * ev.rule.double()).sum(-1).mean().item()
    kl = (p * (logp.double() - ev.ref_logp.double())).sum(-1).mean().item()
    return reward, kl, (reward - mean) / sd - ev.beta * kl


def true_optimum(ev, L):
    """J*_true and J_true(pi_ref) under the standardized hidden rule."""
    from rlhf_trainer.toy import optimal_objective
    mean, sd = 0.5, ((L + 2) / (12 * L)) ** 0.5
    r_std = (ev.rule.double() - mean) / sd
    start = (ev.ref_logp.double().exp() * r_std).sum(-1).mean().item()
    return optimal_objective(ev.ref_logp, r_std, ev.beta), start


def run_one(loss, n, seed, noise, out, rm_steps=None, ppo_steps=None, ppo=True, log=print):
    """One reward model (``loss`` on n annotations), pi* and (``ppo``) PPO against it -> a row of
    COLUMNS (the PPO columns None without PPO)."""
    from rlhf_trainer.config import Config
    from rlhf_trainer.demo import make_trainer
    from rlhf_trainer.models import build_policy, frozen_copy
    from rlhf_trainer.sequences import score_function
    from rlhf_trainer.reward import train_reward_model
    from rlhf_trainer.toy import ExactEvaluator, ToyTask
    cfg = Config(device="cpu", seed=seed)
    rm_cfg = dataclasses.replace(cfg.reward_model, loss=loss, num_train=n, noise=noise,
                                 batch_size=min(cfg.reward_model.batch_size, n), num_eval=min(n, 1024))
    cfg = Config.from_dict({**cfg.to_dict(), "reward_model": dataclasses.asdict(rm_cfg)})
    if ppo_steps:
        cfg.ppo.steps = ppo_steps
    if rm_steps:
        cfg.reward_model.steps = rm_steps
    task, L = ToyTask(cfg.task), cfg.task.response_len
    t0 = time.perf_counter()
    rm, _ = train_reward_model(task, cfg.model, cfg.reward_model, seed, log=log)
    rm_s = time.perf_counter() - t0
    ref = frozen_copy(build_policy(cfg.model, cfg.task))
    ev = ExactEvaluator(task, ref, score_function(task, reward_model=rm), cfg.beta)
    J_star_true, J_ref_true = true_optimum(ev, L)
    opt = true_objective(ev, ev.optimal_logp(), L)
    gap = J_star_true - J_ref_true
    row = dict.fromkeys(COLUMNS)
    row.update(feedback=FEEDBACK[loss], loss=loss, n=n, seed=seed, rm_accuracy=exact_accuracy(ev.scores, ev.rule, L),
               opt_true_reward=opt[0], opt_kl=opt[1], opt_true_J=opt[2],
               opt_true_gap_closed=(opt[2] - J_ref_true) / gap, rm_s=rm_s)
    if ppo:
        run_dir = os.path.join(out, "runs", "%s_n%d_seed%d" % (loss, n, seed))
        os.makedirs(run_dir, exist_ok=True)
        trainer = make_trainer(cfg, task, rm, run_dir, log=lambda *a: None, evaluator=ev)
        t0 = time.perf_counter()
        start = trainer.evaluate()
        while trainer.step < trainer.total_steps:
            trainer.train_step(evaluate=trainer.step + 1 == trainer.total_steps)
        end = trainer.history[-1]
        r, kl, J = true_objective(ev, ev.policy_logp(trainer.policy), L)
        row.update(ppo_true_reward=r, ppo_kl=kl, ppo_true_J=J, ppo_true_gap_closed=(J - J_ref_true) / gap,
                   ppo_gap_closed=(end["J"] - start["J"]) / (start["J_star"] - start["J"]),
                   ppo_s=time.perf_counter() - t0)
    log("%s n=%d seed %d: exact accuracy %.3f; pi* true reward %.3f, true gap closed %.1f%%%s"
        % (loss, n, seed, row["rm_accuracy"], opt[0], 100 * row["opt_true_gap_closed"],
           "" if not ppo else "; PPO %.3f, %.1f%%" % (row["ppo_true_reward"], 100 * row["ppo_true_gap_closed"])))
    return row


def sweep(out, ns, seeds, noise, losses=LOSSES, rm_steps=None, ppo_steps=None, ppo_ns=None, log=print, threads=1):
    """Every (loss, n, seed), PPO for the n of ``ppo_ns`` (None: every n); writes feedback.csv,
    feedback.md and feedback.png into ``out``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    meta = {"noise": noise, "seeds": list(seeds), "rm_steps": rm_steps, "ppo_steps": ppo_steps,
            "threads": threads, "torch": torch.__version__, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    rows = []
    try:
        for seed in seeds:              # a seed at a time: the files are rewritten after every run
            for n in ns:
                for loss in losses:
                    ppo = ppo_ns is None or n in ppo_ns
                    rows.append(run_one(loss, n, seed, noise, out, rm_steps, ppo_steps, ppo, log))
                    write(out, rows, dict(meta, total_s=time.perf_counter() - t0))
    finally:
        torch.set_num_threads(before)
    return rows, dict(meta, total_s=time.perf_counter() - t0)


def write(out, rows, meta):
    with open(os.path.join(out, "feedback.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "feedback.md"), "w") as f:
        f.write(markdown(rows, meta))
    plot(rows, os.path.join(out, "feedback.png"), meta)


def means(rows):
    """(loss, n) -> {column: (mean, sd over seeds)}, in the rows' order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["loss"], r["n"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        t = {c: torch.tensor([float(r[c]) for r in rs if r[c] not in (None, "")], dtype=torch.float64)
             for c in COLUMNS[4:]}
        out[key] = {c: (v.mean().item(), v.std().item() if len(v) > 1 else 0.0) if len(v) else None
                    for c, v in t.items()}
    return out


def markdown(rows, meta):
    m = means(rows)
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = ["`python -m rlhf_trainer.feedback`, %s, %d CPU(s), torch %s (%d thread%s), annotator noise %g, "
             "%s, reward models of %s steps, PPO of %s steps: %.0f s in all." % (
                 meta["date"], meta["cpus"], meta["torch"], meta["threads"], "" if meta["threads"] == 1 else "s",
                 meta["noise"], "seed %d (one run each)" % seeds[0] if len(seeds) == 1
                 else "seeds %s (mean +- sd)" % ",".join(str(s) for s in seeds),
                 meta["rm_steps"] or "the config's", meta["ppo_steps"] or "the config's", meta["total_s"]),
             "",
             "| N | feedback (loss) | exact pairwise accuracy | PPO: true reward | PPO: true J gap closed "
             "| PPO: exact KL | pi* of the RM: true reward | pi*: true J gap closed |",
             "|---|---|---|---|---|---|---|---|"]
    sd = len(seeds) > 1                 # one seed: no spread to show
    pm = lambda c: "-" if c is None else ("%.3f +- %.3f" % c if sd else "%.3f" % c[0])  # noqa: E731
    pc = lambda c: "-" if c is None else ("%.1f%% +- %.1f" % (100 * c[0], 100 * c[1]) if sd  # noqa: E731
                                          else "%.1f%%" % (100 * c[0]))
    for (loss, n), v in m.items():
        lines.append("| %d | %s (%s) | %s | %s | %s | %s | %s | %s |" % (
            n, FEEDBACK[loss], loss, pm(v["rm_accuracy"]), pm(v["ppo_true_reward"]), pc(v["ppo_true_gap_closed"]),
            pm(v["ppo_kl"]), pm(v["opt_true_reward"]), pc(v["opt_true_gap_closed"])))
    return "\n".join(lines) + "\n"


def plot(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = means(rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, loss in enumerate(dict.fromkeys(r["loss"] for r in rows)):
        ns = sorted(n for (lo, n) in m if lo == loss)
        for ax, col, title in zip(axes, ("rm_accuracy", "ppo_true_gap_closed", "opt_true_gap_closed"),
                                  ("reward model: exact pairwise accuracy", "PPO against it: true J, gap closed",
                                   "pi* of the reward model: true J, gap closed")):
            xs = [n for n in ns if m[(loss, n)][col] is not None]
            y = [m[(loss, n)][col][0] for n in xs]
            e = [m[(loss, n)][col][1] for n in xs]
            ax.errorbar(xs, y, yerr=e, fmt="o-", color="C%d" % i, capsize=3, label="%s (%s)" % (FEEDBACK[loss], loss))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N annotations (comparisons, or rated responses)")
            ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    k = len({r["seed"] for r in rows})
    fig.suptitle("Reward models from N comparisons vs N Likert ratings (annotator noise %g, %d seed%s, "
                 "reward models of %s steps)" % (meta["noise"], k, "" if k == 1 else "s",
                                                 meta["rm_steps"] or "the config's"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rlhf_trainer.feedback", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", default="256,1024,4096", help="numbers of annotations, comma-separated")
    p.add_argument("--seeds", default="0", help="seeds, comma-separated (default 0)")
    p.add_argument("--noise", type=float, default=0.25, help="the annotator's noise (sd of its latent quality)")
    p.add_argument("--losses", default=",".join(LOSSES), help="reward-model losses, comma-separated")
    p.add_argument("--rm-steps", type=int, default=RM_STEPS,
                   help="reward-model steps (default %d; 0: the config's)" % RM_STEPS)
    p.add_argument("--ppo-steps", type=int, default=25, help="PPO steps (default 25; 0: the config's)")
    p.add_argument("--ppo-n", default="1024", help="run PPO only for these N, comma-separated (default 1024; "
                   "'all': every N)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = p.parse_args(argv)
    losses = a.losses.split(",")
    bad = [x for x in losses if x not in FEEDBACK]
    if bad:
        p.error("--losses: unknown %s; choose from %s" % (", ".join(bad), ", ".join(FEEDBACK)))
    os.makedirs(a.out, exist_ok=True)
    ppo_ns = None if a.ppo_n == "all" else [int(x) for x in a.ppo_n.split(",")]
    rows, meta = sweep(a.out, [int(x) for x in a.n.split(",")], [int(x) for x in a.seeds.split(",")], a.noise,
                       losses, a.rm_steps, a.ppo_steps, ppo_ns, threads=a.threads)
    print("\n" + markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
