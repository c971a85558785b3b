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


def score_label(run_dir):
    """What the logged score_mean is, from the run's config.yaml (a round of an iterated run: its
    parent's): a toy run's reward model, or a real run's reward model and/or reward.fn."""
    import yaml
    for d in (run_dir, os.path.dirname(os.path.abspath(run_dir))):
        path = os.path.join(d, "config.yaml")
        if os.path.exists(path):
            with open(path) as f:
                cfg = yaml.safe_load(f) or {}
            break
    else:
        cfg = {}
    if "policy" not in cfg:
        return "reward-model score (sampled)"
    reward = cfg.get("reward") or {}
    parts = (["reward model of the round"] if "iterate" in cfg else
             ["reward-model score"] if reward.get("model") else [])
    parts += ["reward.fn %s" % reward["fn"]] if reward.get("fn") else []
    return "%s (sampled)" % (" + ".join(parts) or "reward")


def curve_panels(rows, start=None, score="reward-model score (sampled)"):
    """What curves.png draws from the log's rows: a list of panels {"title", "xlabel", "lines":
    [(label, xs, ys, fmt)], "hline": (y, label) or None}, with only the series that have data (a run
    on real models has no exact J and no hidden rule) and only the panels that have a series."""
    rounds = bool(rows) and "approx_kl" not in rows[0]     # expert iteration: one row per round
    unit = "round" if rounds else "step"
    ev = [r for r in rows if r.get("J") is not None]
    xs = ([0] if start else []) + [r["step"] for r in ev]

    def exact(key):
        return ([start[key]] if start else []) + [r[key] for r in ev]
    steps = [r["step"] for r in rows]
    objective = [("J(policy), exact", xs, exact("J"), "o-")]
    reward = [(score, steps, [r["score_mean"] for r in rows], "-")]
    if rounds:
        reward.append(("winners' score (sampled)", steps, [r["winner_score_mean"] for r in rows], "-"))
    reward.append(("hidden-rule reward, exact", xs, exact("J_rule"), "o-"))
    if rounds:
        drift = [("KL to the reference, exact", xs, exact("exact_kl"), "o-"),
                 ("SFT loss (per token)", steps, [r["sft_loss"] for r in rows], "-")]
    else:
        drift = [("KL per sequence (%s)" % rows[0]["kl_estimator"], steps, [r["kl_seq_sum"] for r in rows], "-"),
                 ("entropy per token", steps, [r["entropy"] for r in rows], "-"),
                 ("approx_kl x100", steps, [r["approx_kl"] * 100 for r in rows], "-")] if rows else []
    panels = [
        {"title": "KL-regularized objective", "lines": objective,
         "hline": (ev[-1]["J_star"], "J* (optimum)") if ev else None},
        {"title": "reward", "lines": reward, "hline": None},
        {"title": "policy drift", "lines": drift, "hline": None},
    ]
    for panel in panels:
        panel["xlabel"] = unit
        panel["lines"] = [line for line in panel["lines"] if line[1] and all(y is not None for y in line[2])]
    return [panel for panel in panels if panel["lines"]]


def plot_run(run_dir, start=None, path=None):
    """curves.png of a run directory (``curve_panels`` of its log.jsonl) -> its path."""
    plt = _pyplot()
    rows = read_log(run_dir)
    if start is None and os.path.exists(os.path.join(run_dir, "start.json")):
        with open(os.path.join(run_dir, "start.json")) as f:
            start = json.load(f)
    path = path or os.path.join(run_dir, "curves.png")
    panels = curve_panels(rows, start, score_label(run_dir))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(13 * max(len(panels), 1) / 3, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, xs, ys, fmt in panel["lines"]:
            ax.plot(xs, ys, fmt, label=label)
        if panel["hline"] is not None:
            ax.axhline(panel["hline"][0], color="k", ls="--", label=panel["hline"][1])
        ax.set_xlabel(panel["xlabel"])
        ax.set_title(panel["title"])
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
