"""`python -m rlhf_trainer plot RUN_DIR`: learning curves from log.jsonl to curves.png.
Also the best-of-n curve (J, E[r] and KL against n) used by the demo and the comparison."""

import json
import os


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(run_dir, start=None, path=None):
    plt = _pyplot()
    rows = read_log(run_dir)
    if start is None and os.path.exists(os.path.join(run_dir, "start.json")):
        with open(os.path.join(run_dir, "start.json")) as f:
            start = json.load(f)
    path = path or os.path.join(run_dir, "curves.png")
    rounds = bool(rows) and "approx_kl" not in rows[0]     # expert iteration: one row per round
    unit = "round" if rounds else "step"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ev = [r for r in rows if r["J"] is not None]
    xs = ([0] if start else []) + [r["step"] for r in ev]
    ax = axes[0]
    ax.plot(xs, ([start["J"]] if start else []) + [r["J"] for r in ev], "o-", label="J(policy), exact")
    if ev:
        ax.axhline(ev[-1]["J_star"], color="k", ls="--", label="J* (optimum)")
    ax.set_xlabel(unit)
    ax.set_title("KL-regularized objective")
    ax.legend(fontsize=8)
    ax = axes[1]
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["score_mean"] for r in rows], label="reward-model score (sampled)")
    if rounds:
        ax.plot(steps, [r["winner_score_mean"] for r in rows], label="winners' score (sampled)")
    ax.plot(xs, ([start["J_rule"]] if start else []) + [r["J_rule"] for r in ev], "o-",
            label="hidden-rule reward, exact")
    ax.set_xlabel(unit)
    ax.set_title("reward")
    ax.legend(fontsize=8)
    ax = axes[2]
    if rounds:
        ax.plot(xs, ([start["exact_kl"]] if start else []) + [r["exact_kl"] for r in ev], "o-",
                label="KL to the reference, exact")
        ax.plot(steps, [r["sft_loss"] for r in rows], label="SFT loss (per token)")
    else:
        ax.plot(steps, [r["kl_seq_sum"] for r in rows], label="KL per sequence (%s)" % rows[0]["kl_estimator"])
        ax.plot(steps, [r["entropy"] for r in rows], label="entropy per token")
        ax.plot(steps, [r["approx_kl"] * 100 for r in rows], label="approx_kl x100")
    ax.set_xlabel(unit)
    ax.set_title("policy drift")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_best_of_n(curve, path):
    """curve: exact_best_of_n results for increasing n -> a PNG of E[r] and J, and the KL
    against its bound log n - (n-1)/n."""
    plt = _pyplot()
    ns = [c["n"] for c in curve]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.plot(ns, [c["reward"] for c in curve], "o-", label="E[r] (reward model), exact")
    ax.plot(ns, [c["J"] for c in curve], "s-", label="J = E[r] - beta KL, exact")
    ax.plot(ns, [c["J_rule"] for c in curve], "^-", label="hidden-rule reward, exact")
    ax.axhline(curve[0]["J_star"], color="k", ls="--", label="J* (optimum)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n")
    ax.set_title("best-of-n from the reference")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(ns, [c["exact_kl"] for c in curve], "o-", label="KL(best-of-n || pi_ref), exact")
    ax.plot(ns, [c["kl_bound"] for c in curve], "k--", label="bound log n - (n-1)/n")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n")
    ax.set_title("KL to the reference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
