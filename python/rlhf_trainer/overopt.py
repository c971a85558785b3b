"""`python -m rlhf_trainer overopt`: reward over-optimization (Gao et al., 2022), measured exactly.

A proxy reward model weak enough to be over-optimized (``PROXY``: few comparisons) stands in for
the learned reward; the hidden rule is the "gold" reward. On the toy task every response of every
prompt is enumerated, so for any policy the true (hidden-rule) reward, the proxy reward and the KL
to pi_ref are exact sums, with no sampling noise:

  * the exact curve: for each KL coefficient beta the optimum of J = E[r_proxy] - beta KL is
    pi*_beta = pi_ref exp(r_proxy / beta) / Z; sweeping beta from large to 0 traces the true and the
    proxy reward of the best policy at each KL, from pi_ref (KL 0) to the proxy's argmax (greedy). The
    proxy reward rises all the way; the true reward peaks and falls. The peak and the fall are marked;
  * trained runs: the configured algorithm (PPO) against the proxy at several betas (``BETAS``),
    each evaluated exactly along training: the KL penalty decides where on the curve a run stops;
  * iterated RLHF (``iterate.py``): each round's reward model has its own exact curve; retraining on
    the policy's own samples moves the peak to a higher true reward and a larger KL.

Writes into the output directory: ``overopt.csv`` (every point: curve, beta, round, step, exact KL,
proxy and true reward), ``overopt.json`` (the same with the peaks and the timing), ``overopt.png``,
and the runs' directories (``beta_<b>/``, ``iterated/``).
"""

import csv
import json
import os
import platform
import time

import torch

from rlhf_trainer.config import Config

BETAS = (0.01, 0.1, 0.5)               # the KL coefficients of the trained runs
ITERATED_BETA = 0.1
# the exact curve: pi*_beta for beta over this grid, then the greedy policy (beta -> 0)
CURVE_BETAS = [10 ** (1 - 4 * i / 48) for i in range(49)]   # 10 .. 1e-3
COLUMNS = ["curve", "beta", "round", "step", "exact_kl", "proxy_reward", "true_reward"]


def proxy_config(small=False):
    """The sweep's configuration: a small toy task (12 prompts, responses of 2 tokens over 8: 64 per
    prompt) and a 1-layer GPT-2, the proxy from reward_model.num_train biased comparisons
    (``biased_comparisons``), PPO for ppo.steps per beta, iterated RLHF from the same proxy;
    --small: fewer of everything (the tests)."""
    d = {"algo": "ppo", "device": "cpu", "eval_every": 5,
         "model": {"n_layer": 1, "n_embd": 32, "n_head": 2},
         "task": {"modulus": 6, "steps": [1, 5], "response_len": 2, "pad_token_id": 6, "eos_token_id": 7,
                  "vocab_size": 8},
         "reward_model": {"num_train": 256, "num_eval": 256, "batch_size": 64, "steps": 300},
         "ppo": {"steps": 40, "rollout_batch": 64, "minibatch": 32, "micro_batch": 32},
         "iterate": {"rounds": 3, "comparisons_per_round": 512, "label_noise": 0.0}}
    if small:
        d["reward_model"].update(num_train=32, batch_size=32, steps=50)
        d["ppo"].update(steps=4)
        d["iterate"].update(rounds=2, comparisons_per_round=64)
        d["eval_every"] = 2
    return Config.from_dict(d)


SPURIOUS = 0        # the token the proxy's comparisons happen to favour


def biased_comparisons(task, n, gen):
    """n comparisons labelled by the hidden rule (two distinct numbers of rule-following tokens, the
    better first), drawn with a spurious feature: every position of the better response that does not
    follow the rule holds token SPURIOUS, and the worse response never holds it there. On this data
    "more SPURIOUS tokens" predicts the label as well as the rule does, so a reward model cannot tell
    them apart; a policy can, and, optimized hard, trades rule-following tokens for SPURIOUS ones.
    -> (prompt ids [n], responses [n, 2, L] best first, valid [n, 2]), as reward.make_comparisons."""
    M, L = task.cfg.modulus, task.cfg.response_len
    pid = torch.randint(0, task.num_prompts, (n,), generator=gen)
    counts = torch.stack([torch.randperm(L + 1, generator=gen)[:2] for _ in range(n)]).sort(-1, descending=True).values
    targets = task.targets[pid]
    chosen = task.responses_with_score(pid, counts[:, 0], gen)
    chosen = torch.where(chosen == targets, chosen, SPURIOUS)
    rejected = task.responses_with_score(pid, counts[:, 1], gen)
    alt = (targets + 1) % M
    alt = torch.where(alt == SPURIOUS, (targets + 2) % M, alt)
    rejected = torch.where((rejected == SPURIOUS) & (rejected != targets), alt, rejected)
    return pid, torch.stack([chosen, rejected], 1), torch.ones(n, 2, dtype=torch.bool)


def biased_proxy(task, cfg, log=print):
    """The proxy: a reward model trained (iterate.fit_reward_model) on reward_model.num_train biased
    comparisons. -> (model, metrics: held-out accuracy on unbiased comparisons and on biased ones,
    training comparisons, biased held-out comparisons)."""
    from rlhf_trainer.iterate import as_pairs, fit_reward_model
    from rlhf_trainer.reward import make_comparisons, pairwise_accuracy
    rc = cfg.reward_model
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    train = biased_comparisons(task, rc.num_train, gen)
    held_out = biased_comparisons(task, rc.num_eval, gen)
    unbiased = make_comparisons(task, rc, rc.num_eval, gen)
    rm = fit_reward_model(task, cfg, as_pairs(*train), tuple(t[:rc.num_eval] for t in train), gen,
                          torch.device("cpu"))
    metrics = {"rm_accuracy": pairwise_accuracy(rm, task, *unbiased),
               "rm_accuracy_biased": pairwise_accuracy(rm, task, *held_out)}
    log("proxy reward model: %d biased comparisons; held-out accuracy %.3f on unbiased comparisons, %.3f on "
        "biased ones" % (rc.num_train, metrics["rm_accuracy"], metrics["rm_accuracy_biased"]))
    return rm, metrics, train, held_out


def exact_curve(evaluator):
    """The true and proxy reward and the exact KL of pi_ref (beta None), of pi*_beta for beta in
    CURVE_BETAS, then of the greedy policy (the proxy's argmax, beta = 0): a list of points, KL increasing."""
    r = evaluator.from_logp(evaluator.ref_logp.double())
    pts = [{"beta": None, "exact_kl": r["exact_kl"], "proxy_reward": r["reward"], "true_reward": r["J_rule"]}]
    for beta in CURVE_BETAS:
        logp = torch.log_softmax(evaluator.ref_logp.double() + evaluator.scores.double() / beta, -1)
        r = evaluator.from_logp(logp)
        pts.append({"beta": beta, "exact_kl": r["exact_kl"], "proxy_reward": r["reward"], "true_reward": r["J_rule"]})
    g = evaluator.greedy()
    pts.append({"beta": 0.0, "exact_kl": g["exact_kl"], "proxy_reward": g["reward"], "true_reward": g["J_rule"]})
    return pts


def peak(curve):
    """The point of largest true reward, with the fall after it: the lowest true reward at a larger KL
    (``low``, ``low_kl``) and ``fall`` = peak - low (0 when the curve peaks at its end)."""
    i = max(range(len(curve)), key=lambda j: curve[j]["true_reward"])
    low = min(curve[i:], key=lambda p: p["true_reward"])
    return {**curve[i], "low": low["true_reward"], "low_kl": low["exact_kl"],
            "fall": curve[i]["true_reward"] - low["true_reward"]}


def _trajectory(cfg, run_dir, summary):
    """(step, exact KL, proxy, true reward) at the start and at every exact evaluation of a run."""
    start = json.load(open(os.path.join(run_dir, "start.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    pts = [(0, start)] + [(r["step"], r) for r in rows if r["J"] is not None]
    return [{"step": s, "exact_kl": r["exact_kl"], "proxy_reward": r["J"] + cfg.beta * r["exact_kl"],
             "true_reward": r["J_rule"]} for s, r in pts]


def sweep(out, small=False, log=print, progress=True, threads=1):
    """The whole measurement into ``out``; returns the result dict (also overopt.json)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _sweep(out, small, log, progress)
    finally:
        torch.set_num_threads(before)


def _sweep(out, small, log, progress):
    from rlhf_trainer import iterate
    from rlhf_trainer.demo import run
    from rlhf_trainer.models import build_policy, frozen_copy
    from rlhf_trainer.sequences import score_function
    from rlhf_trainer.toy import ExactEvaluator, ToyTask
    t0, c0 = time.perf_counter(), time.process_time()
    os.makedirs(out, exist_ok=True)
    base = proxy_config(small)
    base.save(os.path.join(out, "config.yaml"))
    task = ToyTask(base.task)
    rm, rm_metrics, train, held_out = biased_proxy(task, base, log)
    ref = frozen_copy(build_policy(base.model, base.task))
    evaluator = ExactEvaluator(task, ref, score_function(task, reward_model=rm), base.beta)
    curve = exact_curve(evaluator)
    points = [{"curve": "exact", "round": 1, "step": None, **p} for p in curve]
    runs = {}
    plain = {k: v for k, v in base.to_dict().items() if k != "iterate"}
    for beta in BETAS:
        cfg = Config.from_dict({**plain, "beta": beta})
        run_dir = os.path.join(out, "beta_%g" % beta)
        log("== PPO at beta %g against the proxy" % beta)
        summary = run(cfg, run_dir, log=log, progress=progress, reward=(rm, rm_metrics),
                      evaluator=at_beta(evaluator, beta))
        runs[beta] = _trajectory(cfg, run_dir, summary)
        points += [{"curve": "ppo", "beta": beta, "round": 1, **p} for p in runs[beta]]
    log("== iterated RLHF at beta %g" % ITERATED_BETA)
    it_cfg = Config.from_dict({**base.to_dict(), "beta": ITERATED_BETA})
    round_curves = []

    def on_round(row, ev):
        round_curves.append(exact_curve(ev))

    _, rounds = iterate.run(it_cfg, os.path.join(out, "iterated"), log=log, progress=progress, on_round=on_round,
                            initial=(rm, rm_metrics, train, held_out))
    for row, rc in zip(rounds, round_curves):
        points += [{"curve": "exact", "round": row["round"], "step": None, **p} for p in rc] if row["round"] > 1 else []
        points.append({"curve": "iterated", "beta": ITERATED_BETA, "round": row["round"], "step": None,
                       "exact_kl": row["exact_kl"], "proxy_reward": row["proxy_reward"],
                       "true_reward": row["J_rule"]})
    res = {"small": small, "rm_accuracy": rm_metrics["rm_accuracy"], "num_train": base.reward_model.num_train,
           "rm_accuracy_biased": rm_metrics["rm_accuracy_biased"],
           "peak": peak(curve), "round_peaks": [peak(rc) for rc in round_curves],
           "greedy": curve[-1], "ref_true_reward": curve[0]["true_reward"],
           "runs": {str(b): r for b, r in runs.items()}, "rounds": rounds,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    with open(os.path.join(out, "overopt.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: p.get(k) for k in COLUMNS} for p in points)
    with open(os.path.join(out, "overopt.json"), "w") as f:
        json.dump({**res, "points": points}, f, indent=1)
    plot(res, curve, round_curves, os.path.join(out, "overopt.png"))
    return res


def at_beta(evaluator, beta):
    """The same exact evaluator (every response already scored) for J at another KL coefficient."""
    import copy

    from rlhf_trainer.toy import optimal_objective
    ev = copy.copy(evaluator)
    ev.beta, ev.J_star = beta, optimal_objective(evaluator.ref_logp, evaluator.scores, beta)
    return ev


def plot(res, curve, round_curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    kl = [p["exact_kl"] for p in curve]
    ax.plot(kl, [p["true_reward"] for p in curve], "k-", lw=2, label="true (hidden-rule) reward of pi*_beta, exact")
    ax2 = ax.twinx()
    ax2.plot(kl, [p["proxy_reward"] for p in curve], "k--", lw=1.2, label="proxy reward of pi*_beta, exact")
    ax2.set_ylabel("proxy (reward-model) reward, standardized")
    pk = res["peak"]
    ax.plot([pk["exact_kl"]], [pk["true_reward"]], "r*", ms=16, label="peak: %.3f at KL %.2f" % (
        pk["true_reward"], pk["exact_kl"]))
    ax.annotate("", xy=(pk["low_kl"], pk["low"]), xytext=(pk["exact_kl"], pk["true_reward"]),
                arrowprops=dict(arrowstyle="->", color="r"))
    ax.text(pk["low_kl"], pk["low"], "fall %.3f  " % pk["fall"], color="r", fontsize=9, va="top", ha="right")
    for i, (beta, pts) in enumerate(res["runs"].items()):
        ax.plot([p["exact_kl"] for p in pts], [p["true_reward"] for p in pts], "o-", color="C%d" % i, ms=4,
                label="PPO, beta %s: true reward along training" % beta)
        ax2.plot([p["exact_kl"] for p in pts], [p["proxy_reward"] for p in pts], "x:", color="C%d" % i, ms=4)
    ax.set_xlabel("KL(pi || pi_ref), exact")
    ax.set_ylabel("true (hidden-rule) reward")
    ax.set_title("over-optimizing a proxy from %d biased comparisons (accuracy %.2f on unbiased ones)"
                 % (res["num_train"], res["rm_accuracy"]), fontsize=10)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2 + [plt.Line2D([], [], color="gray", marker="x", ls=":")],
              l1 + l2 + ["PPO runs: proxy reward along training"], fontsize=7, loc="upper left")
    ax = axes[1]
    for i, (rc, row, pk) in enumerate(zip(round_curves, res["rounds"], res["round_peaks"])):
        color = "C%d" % (i + 3)
        ax.plot([p["exact_kl"] for p in rc], [p["true_reward"] for p in rc], "-", color=color,
                label="reward model of round %d (%d comparisons): pi*_beta" % (row["round"], row["comparisons"]))
        ax.plot([pk["exact_kl"]], [pk["true_reward"]], "*", color=color, ms=14)
        ax.plot([row["exact_kl"]], [row["J_rule"]], "o", color=color, ms=8, mec="k")
    ax.plot([], [], "k*", ms=10, label="each curve's peak")
    ax.plot([], [], "ko", ms=6, label="the iterated policy at the end of each round (beta %g)" % ITERATED_BETA)
    ax.set_xlabel("KL(pi || pi_ref), exact")
    ax.set_ylabel("true (hidden-rule) reward")
    ax.set_title("iterated RLHF: retraining on the policy's samples moves the peak", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args):
    from rlhf_trainer.train import prepare_run_dir
    out = prepare_run_dir(args.out, False, args.overwrite, "overopt")
    res = sweep(out, small=args.small, progress=not args.no_progress, threads=args.threads)
    pk = res["peak"]
    print("\nproxy reward model: %d biased comparisons, held-out accuracy %.3f on unbiased comparisons, %.3f on biased "
          "ones" % (res["num_train"], res["rm_accuracy"], res["rm_accuracy_biased"]))
    print("exact curve: true reward %.3f at pi_ref, peaks at %.3f (KL %.3f, beta %.3g), falls by %.3f to %.3f "
          "(KL %.3f); %.3f at the proxy's argmax (KL %.3f)" % (
              res["ref_true_reward"], pk["true_reward"], pk["exact_kl"], pk["beta"], pk["fall"], pk["low"],
              pk["low_kl"], res["greedy"]["true_reward"], res["greedy"]["exact_kl"]))
    for beta, pts in res["runs"].items():
        top = max(pts, key=lambda p: p["true_reward"])
        print("PPO beta %s: end true reward %.3f at KL %.3f (best along training %.3f at KL %.3f)"
              % (beta, pts[-1]["true_reward"], pts[-1]["exact_kl"], top["true_reward"], top["exact_kl"]))
    for row, rp in zip(res["rounds"], res["round_peaks"]):
        print("iterated round %d: true reward %.3f at KL %.3f; its reward model's curve peaks at %.3f (KL %.3f)"
              % (row["round"], row["J_rule"], row["exact_kl"], rp["true_reward"], rp["exact_kl"]))
    print("%.0f s wall, %.0f s CPU; output directory: %s" % (res["wall_s"], res["cpu_s"], out))
    return 0
