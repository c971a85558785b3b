"""`python -m rlhf_trainer compare`: every algorithm with its tuned default configuration,
against one reward model (trained once) and the exact optimum J* of the toy task.

Writes into the output directory: ``compare.md`` and ``compare.csv`` (the table),
``compare.json`` (the same with every run's summary and the best-of-n curve),
``compare.png`` (exact J against the samples drawn, every algorithm),
``compare_best_of_n.png`` (best-of-n over n = 1, 2, 4, ..., 64, exactly), and one run
directory per algorithm as the demo writes it.

The wall time of an algorithm is its own work (sampling, scoring, updates), without the
exact evaluations (a measuring instrument, reported apart as ``eval_s``) and without the
shared reward model. Best-of-n trains nothing: its time is that of serving
``best_of_n.sample_queries`` queries by sampling, and its samples are per query.
"""

import csv
import json
import os
import platform
import time

import torch

from rlhf_trainer.config import ALGOS, Config
from rlhf_trainer.demo import reward_model, run, small_config
from rlhf_trainer.plot import plot_best_of_n

CURVE_NS = [2 ** k for k in range(13)]    # 1, 2, 4, ..., 64, ..., 4096 (where J peaks on the toy task)
COLUMNS = ["algorithm", "J_start", "J_end", "J_star", "gap_closed", "exact_kl", "rule_reward", "wall_s", "eval_s",
           "samples_drawn", "note"]


def algo_config(algo, base, small=False):
    """``algo`` with its tuned defaults, sharing base's objective, task, model, reward model and seed."""
    d = base.to_dict()
    cfg = Config.from_dict({"algo": algo, **{k: d[k] for k in ("beta", "device", "model", "task", "reward_model",
                                                                "seed")}})
    return small_config(cfg) if small else cfg


def compare(out, small=False, algos=ALGOS, log=print, progress=True, threads=1, beta=None):
    """Run every algorithm of ``algos``; returns the rows of the table (also written to ``out``).

    ``threads``: torch's intra-op threads during the comparison (restored after). The models
    are tiny (64-wide GPT-2s), so extra threads buy little, and on a shared machine a second
    spinning thread made steps up to 10x slower and the timings meaningless. ``beta``: another
    KL coefficient for J than the default configuration's (the same for every algorithm)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _compare(out, small, algos, log, progress, beta)
    finally:
        torch.set_num_threads(before)


def _compare(out, small, algos, log, progress, beta):
    from rlhf_trainer.best_of_n import exact_best_of_n
    from rlhf_trainer.models import build_policy, frozen_copy
    from rlhf_trainer.sequences import score_function
    from rlhf_trainer.toy import ExactEvaluator, ToyTask
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    # on the CPU: the models are tiny, and best_of_n and expert_iteration run there anyway
    base = Config(device="cpu") if beta is None else Config(beta=beta, device="cpu")
    base = small_config(base) if small else base
    task = ToyTask(base.task)
    rm, rm_metrics = reward_model(base, task, out, log=log)
    rm_s = time.perf_counter() - t0
    ref = frozen_copy(build_policy(base.model, base.task))
    evaluator = ExactEvaluator(task, ref, score_function(task, reward_model=rm), base.beta)
    rows, runs = [], {}
    for algo in algos:
        cfg = algo_config(algo, base, small)
        log("== %s" % algo)
        run_dir = os.path.join(out, algo)
        summary = run(cfg, run_dir, log=log, progress=progress, reward=(rm, rm_metrics), evaluator=evaluator)
        runs[algo] = {"summary": summary, "curve": _j_curve(cfg, run_dir, summary)}
        rows.append(_row(cfg, summary, run_dir))
    curve = [exact_best_of_n(evaluator, n) for n in CURVE_NS]
    greedy = evaluator.greedy()   # the optimum itself when beta = 0
    kl_star = evaluator.from_logp(evaluator.optimal_logp())["exact_kl"] if base.beta > 0 else greedy["exact_kl"]
    meta = {"small": small, "J_start": evaluator.from_logp(evaluator.ref_logp.double())["J"],
            "J_star": evaluator.J_star, "kl_star": kl_star,
            "greedy_J": greedy["J"], "greedy_kl": greedy["exact_kl"], "greedy_rule": greedy["J_rule"],
            "beta": base.beta, "rm_accuracy": rm_metrics["rm_accuracy"], "rm_s": rm_s,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "total_s": time.perf_counter() - t0}
    _write(out, rows, runs, curve, meta)
    log("compare: %d algorithms in %.0f s; table in %s" % (len(rows), meta["total_s"], os.path.join(out, "compare.md")))
    return rows


def _j_curve(cfg, run_dir, summary):
    """(samples drawn, exact J) at the start and at every evaluation of a run."""
    if cfg.algo == "best_of_n":
        return [(0, summary["J_start"]), (summary["samples_drawn"], summary["J_end"])]
    pts = [(0, summary["J_start"])]
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["J"] is not None:
                pts.append((r["samples"] if "samples" in r else r["step"] * cfg.section.rollout_batch, r["J"]))
    return pts


def _row(cfg, s, run_dir):
    eval_s = 0.0
    note = ""
    if cfg.algo == "best_of_n":
        with open(os.path.join(run_dir, "best_of_n.json")) as f:
            b = json.load(f)
        note = "n=%d; no training: wall time serves %d queries by sampling (sampled E[r] %.4f +- %.4f)" % (
            cfg.best_of_n.n, b["sample_queries"], b["mc_reward"] or float("nan"), b["mc_reward_se"] or float("nan"))
    else:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            eval_s = sum(json.loads(line)["time_eval"] for line in f)
        c = cfg.section
        if cfg.algo == "expert_iteration":
            note = "%d rounds x %d prompts x best-of-%d, SFT %d epochs, lr %g" % (
                c.rounds, c.prompts_per_round, c.n, c.epochs, c.lr)
        else:
            note = "%d steps x %d%s, %d epochs, lr %g, %s" % (
                c.steps, c.rollout_batch,
                " (%d prompts x %d)" % (c.rollout_batch // c.group_size, c.group_size) if hasattr(c, "group_size")
                else "", c.epochs, c.lr, c.loss_agg)
    return {"algorithm": cfg.algo, "J_start": s["J_start"], "J_end": s["J_end"], "J_star": s["J_star"],
            "gap_closed": s["gap_closed"], "exact_kl": s["kl_end"], "rule_reward": s["rule_reward_end"],
            "wall_s": s["train_s"], "eval_s": eval_s, "samples_drawn": s["samples_drawn"], "note": note}


def _write(out, rows, runs, curve, meta):
    with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "runs": runs, "best_of_n_curve": curve}, f, indent=1)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(markdown(rows, curve, meta))
    plot_compare(runs, meta, os.path.join(out, "compare.png"))
    plot_best_of_n(curve, os.path.join(out, "compare_best_of_n.png"))


def markdown(rows, curve, meta):
    lines = [
        "`python -m rlhf_trainer compare%s%s`, %s, %s CPU(s), torch %s (%d thread%s). Exact J = E[r] - beta KL "
        "(beta = %g) with the reward model's r; J(pi_ref) = %.4f, J* = %.4f (KL(pi* || pi_ref) = %.3f); reward "
        "model held-out accuracy %.3f (trained once in %.0f s, shared). Wall time: the algorithm's own work, "
        "without the exact evaluations (eval, apart) and the reward model; %.0f s for the whole comparison."
        % (" --small" if meta["small"] else "", "" if meta["beta"] == Config().beta else " --beta %g" % meta["beta"],
           meta["date"], meta["cpus"], meta["torch"], meta["threads"], "" if meta["threads"] == 1 else "s",
           meta["beta"], meta["J_start"], meta["J_star"], meta["kl_star"], meta["rm_accuracy"], meta["rm_s"],
           meta["total_s"]),
        "",
        "| algorithm | J_end | gap to J* closed | exact KL | hidden-rule reward | wall time | samples drawn | setup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bon = r["algorithm"] == "best_of_n"
        lines.append("| %s | %.4f | %.1f%% | %.4f | %.3f | %.1f s%s | %s | %s |" % (
            r["algorithm"], r["J_end"], 100 * r["gap_closed"], r["exact_kl"], r["rule_reward"], r["wall_s"],
            "" if bon else " (+%.1f s eval)" % r["eval_s"],
            "%d per query" % r["samples_drawn"] if bon else "{:,}".format(r["samples_drawn"]), r["note"]))
    gap = meta["J_star"] - meta["J_start"]
    lines.append("| *greedy: argmax r, no KL (reference, not trained)* | %.4f | %.1f%% | %.4f | %.3f | | | "
                 "how much the KL term matters at this beta |"
                 % (meta["greedy_J"], 100 * (meta["greedy_J"] - meta["J_start"]) / gap, meta["greedy_kl"],
                    meta["greedy_rule"]))
    lines += ["", "Best-of-n from the reference, exactly (KL bound: log n - (n-1)/n):", "",
              "| n | E[r] | exact KL | KL bound | J | gap to J* closed | hidden-rule reward |",
              "|---|---|---|---|---|---|---|"]
    for c in curve:
        lines.append("| %d | %.4f | %.4f | %.4f | %.4f | %.1f%% | %.3f |" % (
            c["n"], c["reward"], c["exact_kl"], c["kl_bound"], c["J"], 100 * (c["J"] - meta["J_start"]) / gap,
            c["J_rule"]))
    return "\n".join(lines) + "\n"


def plot_compare(runs, meta, path):
    """J against the samples drawn (left) and what is left of the gap, J* - J, on a log scale
    (right: the last few percent, where the algorithms differ and where the KL term bites)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    star = meta["J_star"]
    for ax, left in zip(axes, (True, False)):
        for i, (algo, r) in enumerate(runs.items()):
            color = "C%d" % i
            if algo == "best_of_n":
                s = r["summary"]
                y = s["J_end"] if left else star - s["J_end"]
                ax.axhline(y, color=color, ls="-.", lw=1.2, label="best-of-%d (no training; %d samples per query)"
                           % (s["samples_drawn"], s["samples_drawn"]))
                continue
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys if left else [star - y for y in ys], "o-" if algo == "expert_iteration" else ".-",
                    color=color, label=algo)
        greedy = meta["greedy_J"] if left else star - meta["greedy_J"]
        ax.axhline(greedy, color="k", ls=":", lw=1, label="greedy argmax r (ignores the KL)")
        if left:
            ax.axhline(star, color="k", ls="--", label="J* (exact optimum)")
            ax.set_ylabel("J = E[r] - beta KL, exact")
            ax.set_title("KL-regularized objective (beta = %g), every algorithm" % meta["beta"])
        else:
            ax.set_yscale("log")
            ax.set_ylabel("J* - J = beta KL(pi || pi*), exact")
            ax.set_title("what is left of the gap")
        ax.set_xlabel("samples drawn (responses generated)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args):
    from rlhf_trainer.train import prepare_run_dir
    out = prepare_run_dir(args.out, False, args.overwrite, "compare")
    algos = args.algos.split(",") if args.algos else list(ALGOS)
    unknown = [a for a in algos if a not in ALGOS]
    if unknown:
        raise SystemExit("compare: unknown algorithm(s) %s; choose from %s" % (", ".join(unknown), ", ".join(ALGOS)))
    rows = compare(out, small=args.small, algos=algos, progress=not args.no_progress, threads=args.threads,
                   beta=args.beta)
    with open(os.path.join(out, "compare.md")) as f:
        print("\n" + f.read())
    print("output directory: %s" % out)
    return 0 if rows else 1
