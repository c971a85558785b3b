"""The demo: reward model from rule-labelled preferences, then the configured algorithm
(``algo``: PPO by default) against it, scored against the exact optimum of the
KL-regularized objective."""

import json
import os
import time

import torch
from tqdm import tqdm

from rlhf_trainer import parallel
from rlhf_trainer.config import REAL, Config, ConfigError
from rlhf_trainer.plot import plot_run

SUMMARY_KEYS = ["algo", "J_start", "J_end", "J_star", "gap_closed", "rule_reward_start", "rule_reward_end",
                "kl_end", "samples_drawn", "rm_accuracy", "train_s", "wall_s", "world_size"]


def reward_model(cfg, task, run_dir, resume=False, log=print):
    """The reward model of the run directory when resuming, else a freshly trained one (saved there).
    Returns (model, metrics)."""
    from rlhf_trainer.models import ScalarHeadModel
    from rlhf_trainer.reward import train_reward_model
    from rlhf_trainer.devices import resolve_device
    device = resolve_device(cfg.device, cfg.algo)
    rm_path = os.path.join(run_dir, "reward_model.pt")
    if resume and os.path.exists(rm_path):
        rm = ScalarHeadModel(cfg.model, cfg.task, seed_offset=2)
        saved = torch.load(rm_path, weights_only=False, map_location="cpu")
        rm.load_state_dict(saved["state"])
        rm.eval().requires_grad_(False)
        return rm.to(device), saved["metrics"]
    # under torchrun every rank trains the same small reward model (same seed, same data); rank 0 saves it
    rm, rm_metrics = train_reward_model(task, cfg.model, cfg.reward_model, cfg.seed, log=log, device=device)
    if parallel.is_main():
        torch.save({"state": rm.state_dict(), "metrics": rm_metrics}, rm_path)
    return rm, rm_metrics


def make_trainer(cfg, task, rm, run_dir=None, log=print, evaluator=None):
    """The trainer of cfg.algo (every algorithm but best_of_n, which trains nothing)."""
    if cfg.algo == "expert_iteration":
        from rlhf_trainer.expert_iteration import ExpertIterationTrainer
        return ExpertIterationTrainer(cfg, task, reward_model=rm, run_dir=run_dir, log=log, evaluator=evaluator)
    from rlhf_trainer.algos import trainer_class
    return trainer_class(cfg.algo)(cfg, task, reward_model=rm, run_dir=run_dir, log=log, evaluator=evaluator)


def run(cfg, run_dir, log=print, progress=True, resume=False, reward=None, evaluator=None):
    """Train the reward model (unless ``reward`` = (model, metrics) is given) and run cfg.algo;
    returns the summary dict (also written to summary.json). ``evaluator``: an ExactEvaluator
    of that reward model, shared between the runs of a comparison."""
    from rlhf_trainer.dist_checkpoint import find, target
    from rlhf_trainer.toy import ToyTask
    from rlhf_trainer.rundir import check_extension, check_resume
    t0 = time.perf_counter()
    if resume:
        check_resume(run_dir, cfg)
    main = parallel.is_main()     # under torchrun rank 0 alone prints and writes the run's files
    log, progress = parallel.main_only(log), progress and main
    if main:
        os.makedirs(run_dir, exist_ok=True)
        cfg.save(os.path.join(run_dir, "config.yaml"))
    log(cfg.accounting())
    task = ToyTask(cfg.task)
    rm, rm_metrics = reward if reward is not None else reward_model(cfg, task, run_dir, resume, log)
    if cfg.algo == "best_of_n":
        return _run_best_of_n(cfg, task, rm, rm_metrics, run_dir, t0, log, evaluator)
    trainer = make_trainer(cfg, task, rm, run_dir, log, evaluator)
    ckpt, found = target(run_dir), find(run_dir) if resume else None
    start = trainer.evaluate()
    if found:
        trainer.load(found)
        check_extension(cfg, trainer.step, run_dir)
        start = json.load(open(os.path.join(run_dir, "start.json")))
        log("resumed from %s at step %d" % (found, trainer.step))
    elif main:
        open(os.path.join(run_dir, "log.jsonl"), "w").close()
        json.dump(start, open(os.path.join(run_dir, "start.json"), "w"))
    log("start: J = %.4f, J* = %.4f, rule reward %.3f" % (start["J"], start["J_star"], start["J_rule"]))
    total = trainer.total_steps
    bar = tqdm(total=total, initial=trainer.step, disable=not progress, desc=cfg.algo, unit="step")
    while trainer.step < total:
        last = trainer.step + 1 == total
        row = trainer.train_step(evaluate=last or (trainer.step + 1) % cfg.eval_every == 0)
        bar.update(1)
        bar.set_postfix(score="%.3f" % row["score_mean"],
                        kl="-" if row["exact_kl"] is None else "%.2f" % row["exact_kl"],
                        J="-" if row["J"] is None else "%.3f" % row["J"])
        if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
            trainer.save(ckpt)
    bar.close()
    trainer.save(ckpt)
    end = trainer.history[-1]
    samples = end["samples"] if "samples" in end else trainer.step * cfg.section.rollout_batch
    train_s = sum(r["time_step"] - r["time_eval"] for r in trainer.history)
    summary = _summary(cfg.algo, start, end, end["exact_kl"], samples, rm_metrics, train_s, t0)
    if main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plot_run(run_dir, start=start)
    return summary


def _summary(algo, start, end, kl_end, samples, rm_metrics, train_s, t0):
    gap = start["J_star"] - start["J"]
    return {
        "algo": algo, "J_start": start["J"], "J_end": end["J"], "J_star": start["J_star"],
        "gap_closed": (end["J"] - start["J"]) / gap if gap > 0 else float("nan"),
        "rule_reward_start": start["J_rule"], "rule_reward_end": end["J_rule"], "kl_end": kl_end,
        "samples_drawn": samples, "rm_accuracy": rm_metrics["rm_accuracy"], "train_s": train_s,
        "wall_s": time.perf_counter() - t0, "world_size": parallel.world(),
    }


def _run_best_of_n(cfg, task, rm, rm_metrics, run_dir, t0, log, evaluator):
    """best_of_n trains nothing: its exact figures, a sampled check, and its curve over n."""
    from rlhf_trainer.best_of_n import exact_best_of_n, run_best_of_n
    from rlhf_trainer.models import build_policy, frozen_copy
    from rlhf_trainer.plot import plot_best_of_n
    from rlhf_trainer.sequences import score_function
    from rlhf_trainer.toy import ExactEvaluator
    ref = frozen_copy(build_policy(cfg.model, cfg.task))
    score = score_function(task, reward_model=rm)
    if evaluator is None:
        evaluator = ExactEvaluator(task, ref, score, cfg.beta)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)
    res = run_best_of_n(cfg, task, ref, score, evaluator, gen, log=log)
    ns = sorted({2 ** k for k in range(7)} | {cfg.best_of_n.n})
    curve = [exact_best_of_n(evaluator, n) for n in ns]
    with open(os.path.join(run_dir, "best_of_n.json"), "w") as f:
        json.dump({"n": cfg.best_of_n.n, "mc_reward": res["mc_reward"], "mc_reward_se": res["mc_reward_se"],
                   "sample_queries": cfg.best_of_n.sample_queries, "sample_s": res["sample_s"], "curve": curve},
                  f, indent=1)
    plot_best_of_n(curve, os.path.join(run_dir, "curves.png"))
    start, end = res["start"], res["end"]
    summary = _summary("best_of_n", start, end, end["exact_kl"], cfg.best_of_n.n, rm_metrics, res["sample_s"], t0)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def print_table(summary, run_dir):
    samples = ("%d per query" % summary["samples_drawn"] if summary["algo"] == "best_of_n"
               else "%d" % summary["samples_drawn"])
    rows = [
        ("algorithm", summary["algo"]),
        ("J at start", "%.4f" % summary["J_start"]),
        ("J at end", "%.4f" % summary["J_end"]),
        ("J* (exact optimum)", "%.4f" % summary["J_star"]),
        ("gap closed", "%.1f%%" % (100 * summary["gap_closed"])),
        ("exact KL to the reference at end", "%.4f" % summary["kl_end"]),
        ("hidden-rule reward, start -> end", "%.3f -> %.3f" % (summary["rule_reward_start"],
                                                               summary["rule_reward_end"])),
        ("reward model held-out accuracy", "%.3f" % summary["rm_accuracy"]),
        ("samples drawn", samples),
        ("wall time", "%.1f s (%.1f s in the algorithm)" % (summary["wall_s"], summary["train_s"])),
    ] + ([("processes (torchrun)", "%d" % summary["world_size"])] if summary.get("world_size", 1) > 1 else [])
    w = max(len(r[0]) for r in rows)
    print("\n" + "\n".join("%-*s  %s" % (w, k, v) for k, v in rows))
    print("run directory: %s" % run_dir)


def main(args):
    cfg = Config.load(args.config) if args.config else Config()
    if cfg.real:
        raise ConfigError("%s: the demo runs the toy task; a config for real models runs with `rlhf_trainer train`"
                          % next(name for name in REAL if getattr(cfg, name) is not None))
    if args.small:
        cfg = small_config(cfg)
    parallel.check_algo(cfg)
    from rlhf_trainer.devices import resolve_device
    from rlhf_trainer.rundir import RunDirectory
    resolve_device(cfg.device, cfg.algo)            # device: cuda without a GPU stops here
    if cfg.iterate is not None:
        if args.resume:
            raise ConfigError("iterate: an iterated run is not checkpointed, so --resume cannot continue it")
        from rlhf_trainer import iterate
        with RunDirectory(args.out, False, args.overwrite, "demo", checkpoint=None) as run_dir:
            iterate.print_table(iterate.run(cfg, run_dir, progress=not args.no_progress)[1], run_dir)
        return 0
    with RunDirectory(args.out, args.resume, args.overwrite, "demo") as run_dir:  # rank 0's, under torchrun
        summary = run(cfg, run_dir, progress=not args.no_progress, resume=args.resume)
    if parallel.is_main():
        print_table(summary, run_dir)
    return 0


# The CI-sized variant of each algorithm's section (the reward model: 200 steps for all).
SMALL = {
    "ppo": {"steps": 50},
    "grpo": {"steps": 50},
    "rloo": {"steps": 50},
    "reinforce_pp": {"steps": 50},
    "best_of_n": {"sample_queries": 16},
    "expert_iteration": {"rounds": 4},
}


def small_config(cfg):
    """The CI-sized variant used by the tests."""
    d = cfg.to_dict()
    d["reward_model"].update(steps=200)
    d[cfg.algo].update(SMALL[cfg.algo])
    return Config.from_dict(d)
