"""`python -m rlhf_trainer plot RUN_DIR`: learning curves from log.jsonl to curves.png."""

import json
import os


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir, start=None, path=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(run_dir)
    if start is None and os.path.exists(os.path.join(run_dir, "start.json")):
        with open(os.path.join(run_dir, "start.json")) as f:
            start = json.load(f)
    path = path or os.path.join(run_dir, "curves.png")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ev = [r for r in rows if r["J"] is not None]
    xs = ([0] if start else []) + [r["step"] for r in ev]
    ax = axes[0]
    ax.plot(xs, ([start["J"]] if start else []) + [r["J"] for r in ev], "o-", label="J(policy), exact")
    if ev:
        ax.axhline(ev[-1]["J_star"], color="k", ls="--", label="J* (optimum)")
    ax.set_xlabel("PPO step")
    ax.set_title("KL-regularized objective")
    ax.legend(fontsize=8)
    ax = axes[1]
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["score_mean"] for r in rows], label="reward-model score (sampled)")
    ax.plot(xs, ([start["J_rule"]] if start else []) + [r["J_rule"] for r in ev], "o-",
            label="hidden-rule reward, exact")
    ax.set_xlabel("PPO step")
    ax.set_title("reward")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(steps, [r["kl_seq_sum"] for r in rows], label="KL per sequence (%s)" % rows[0]["kl_estimator"])
    ax.plot(steps, [r["entropy"] for r in rows], label="entropy per token")
    ax.plot(steps, [r["approx_kl"] * 100 for r in rows], label="approx_kl x100")
    ax.set_xlabel("PPO step")
    ax.set_title("policy drift")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
