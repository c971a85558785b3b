"""The demo: reward model from rule-labelled preferences, then PPO against it, scored
against the exact optimum of the KL-regularized objective."""

import json
import os
import time

import torch
from tqdm import tqdm

from rlhf_trainer.config import Config
from rlhf_trainer.plot import plot_run
from rlhf_trainer.ppo import PPOTrainer
from rlhf_trainer.reward import train_reward_model
from rlhf_trainer.toy import ToyTask

SUMMARY_KEYS = ["J_start", "J_end", "J_star", "gap_closed", "rule_reward_start", "rule_reward_end",
                "rm_accuracy", "wall_s"]


def run(cfg, run_dir, log=print, progress=True, resume=False):
    """Train the reward model and PPO; returns the summary dict (also written to summary.json)."""
    t0 = time.perf_counter()
    os.makedirs(run_dir, exist_ok=True)
    cfg.save(os.path.join(run_dir, "config.yaml"))
    log(cfg.ppo.accounting())
    task = ToyTask(cfg.task)
    rm_path = os.path.join(run_dir, "reward_model.pt")
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    if resume and os.path.exists(rm_path):
        from rlhf_trainer.models import ScalarHeadModel
        rm = ScalarHeadModel(cfg.model, cfg.task, seed_offset=2)
        saved = torch.load(rm_path, weights_only=False)
        rm.load_state_dict(saved["state"])
        rm.eval().requires_grad_(False)
        rm_metrics = saved["metrics"]
    else:
        rm, rm_metrics = train_reward_model(task, cfg.model, cfg.reward_model, cfg.seed, log=log)
        torch.save({"state": rm.state_dict(), "metrics": rm_metrics}, rm_path)
    trainer = PPOTrainer(cfg, task, reward_model=rm, run_dir=run_dir, log=log)
    start = trainer.evaluate()
    if resume and os.path.exists(ckpt):
        trainer.load(ckpt)
        start = json.load(open(os.path.join(run_dir, "start.json")))
        log("resumed from %s at step %d" % (ckpt, trainer.step))
    else:
        open(os.path.join(run_dir, "log.jsonl"), "w").close()
        json.dump(start, open(os.path.join(run_dir, "start.json"), "w"))
    log("start: J = %.4f, J* = %.4f, rule reward %.3f" % (start["J"], start["J_star"], start["J_rule"]))
    bar = tqdm(total=cfg.ppo.steps, initial=trainer.step, disable=not progress, desc="PPO", unit="step")
    while trainer.step < cfg.ppo.steps:
        last = trainer.step + 1 == cfg.ppo.steps
        row = trainer.train_step(evaluate=last or (trainer.step + 1) % cfg.eval_every == 0)
        bar.update(1)
        bar.set_postfix(score="%.3f" % row["score_mean"], kl="%.2f" % row["kl_seq_sum"],
                        J="-" if row["J"] is None else "%.3f" % row["J"])
        if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
            trainer.save(ckpt)
    bar.close()
    trainer.save(ckpt)
    end = trainer.history[-1]
    gap = start["J_star"] - start["J"]
    summary = {
        "J_start": start["J"], "J_end": end["J"], "J_star": start["J_star"],
        "gap_closed": (end["J"] - start["J"]) / gap if gap > 0 else float("nan"),
        "rule_reward_start": start["J_rule"], "rule_reward_end": end["J_rule"],
        "rm_accuracy": rm_metrics["rm_accuracy"], "wall_s": time.perf_counter() - t0,
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_run(run_dir, start=start)
    return summary


def print_table(summary, run_dir):
    rows = [
        ("J at start", "%.4f" % summary["J_start"]),
        ("J at end", "%.4f" % summary["J_end"]),
        ("J* (exact optimum)", "%.4f" % summary["J_star"]),
        ("gap closed", "%.1f%%" % (100 * summary["gap_closed"])),
        ("hidden-rule reward, start -> end", "%.3f -> %.3f" % (summary["rule_reward_start"],
                                                               summary["rule_reward_end"])),
        ("reward model held-out accuracy", "%.3f" % summary["rm_accuracy"]),
        ("wall time", "%.1f s" % summary["wall_s"]),
    ]
    w = max(len(r[0]) for r in rows)
    print("\n" + "\n".join("%-*s  %s" % (w, k, v) for k, v in rows))
    print("run directory: %s" % run_dir)


def main(args):
    cfg = Config.load(args.config) if args.config else Config()
    if args.small:
        cfg = small_config(cfg)
    run_dir = args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    summary = run(cfg, run_dir, progress=not args.no_progress, resume=args.resume)
    print_table(summary, run_dir)
    return 0


def small_config(cfg):
    """The CI-sized variant used by the tests."""
    d = cfg.to_dict()
    d["reward_model"].update(steps=200)
    d["ppo"].update(steps=50)
    return Config.from_dict(d)
