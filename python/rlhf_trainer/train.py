"""``rlhf_trainer train --config cfg.yaml``: the configured policy-gradient algorithm (ppo, grpo,
rloo, reinforce_pp) on real models, prompts and rewards (``hf.py``).

The run directory gets what the demo's does: config.yaml, log.jsonl (one line per step, the
schema of ``ppo.LOG_KEYS``; the exact-J fields are null: there is no exact optimum here),
curves.png, checkpoint.pt (``--resume`` continues exactly), summary.json, and the final policy
with its tokenizer in ``policy/`` (save_pretrained). A config with an ``iterate`` section runs
iterated RLHF instead (``iterate_hf.py``: its own run directory's layout, no checkpoint).
"""

import json
import os
import time

import torch

from rlhf_trainer import parallel
from rlhf_trainer.config import Config, ConfigError, InputError
from rlhf_trainer.rundir import RunDirectory, check_extension, check_resume, prepare_run_dir  # noqa: F401


def oom_message(cfg, task, step):
    p, g = cfg.section, cfg.generation
    return ("out of memory at step %d with %s.rollout_batch=%d (generated at once), %s.micro_batch=%d (each "
            "forward/backward), generation.max_new_tokens=%d, prompts up to %d tokens, dtype: %s, "
            "gradient_checkpointing: %s; lower %s.micro_batch first, then generation.max_new_tokens or "
            "%s.rollout_batch, or set dtype: bfloat16 and gradient_checkpointing: true"
            % (step, cfg.algo, p.rollout_batch, cfg.algo, p.micro_batch, g.max_new_tokens, task.prompts.shape[1],
               cfg.dtype, str(cfg.gradient_checkpointing).lower(), cfg.algo, cfg.algo))


def check(cfg):
    """What can be refused before anything is written; returns the device."""
    from rlhf_trainer.devices import resolve_device
    if not cfg.real:
        raise ConfigError("policy: train needs a run on real models (policy.model, data.prompts, reward.model or "
                          "reward.fn); the toy task runs with `rlhf_trainer demo`")
    return resolve_device(cfg.device, cfg.algo)


def run(cfg, run_dir, resume=False, log=print, progress=True, config_dir=None):
    """Train cfg.algo on real models into run_dir; returns the summary dict. With an ``iterate``
    section: iterated RLHF (``iterate_hf.run``), not checkpointed."""
    from tqdm import tqdm
    main = parallel.is_main()     # under torchrun rank 0 alone prints and writes the run's files
    log, progress = parallel.main_only(log), progress and main
    if cfg.iterate is not None:
        if resume:
            raise ConfigError("iterate: an iterated run is not checkpointed, so --resume cannot continue it")
        from rlhf_trainer import iterate_hf
        return iterate_hf.run(cfg, run_dir, log=log, progress=progress, config_dir=config_dir)[0]

    from rlhf_trainer import hf
    if not progress:   # transformers' own bars too (loading weights)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    from rlhf_trainer.algos import trainer_class
    from rlhf_trainer.dist_checkpoint import find, target
    from rlhf_trainer.plot import plot_run
    t0 = time.perf_counter()
    device = check(cfg)
    if resume:
        check_resume(run_dir, cfg)
    task, pieces = hf.prepare(cfg, config_dir, log)
    ckpt, found = target(run_dir), find(run_dir) if resume else None
    if main:
        cfg.save(os.path.join(run_dir, "config.yaml"))
    log(cfg.accounting() + "; device %s, %s" % (device, cfg.dtype))
    reward = hf.build_reward(cfg, task, pieces, device, log)
    trainer = trainer_class(cfg.algo)(cfg, task, reward_fn=reward, run_dir=run_dir, log=log)
    if found:
        trainer.load(found)
        check_extension(cfg, trainer.step, run_dir)
        log("resumed from %s at step %d" % (found, trainer.step))
    elif main:
        open(os.path.join(run_dir, "log.jsonl"), "w").close()
    total = trainer.total_steps
    bar = tqdm(total=total, initial=trainer.step, disable=not progress, desc=cfg.algo, unit="step")
    while trainer.step < total:
        try:
            row = trainer.train_step(evaluate=False)
        except torch.cuda.OutOfMemoryError:   # torch.OutOfMemoryError, under its older name
            raise InputError(oom_message(cfg, task, trainer.step + 1)) from None
        bar.update(1)
        bar.set_postfix(score="%.3f" % row["score_mean"], kl="%.2f" % row["kl_seq_sum"])
        if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
            trainer.save(ckpt)
    bar.close()
    trainer.save(ckpt)
    policy_dir = os.path.join(run_dir, "policy")
    if parallel.active():   # the whole policy, gathered to rank 0: a normal save_pretrained folder
        parallel.save_pretrained(trainer.policy, policy_dir)
    else:
        trainer.policy.save_pretrained(policy_dir)
    if main:
        task.tokenizer.save_pretrained(policy_dir)
    h = trainer.history
    summary = {"algo": cfg.algo, "steps": trainer.step,
               "score_start": h[0]["score_mean"], "score_end": h[-1]["score_mean"],
               "kl_seq_sum_end": h[-1]["kl_seq_sum"], "samples_drawn": trainer.step * cfg.section.rollout_batch,
               "device": str(device), "dtype": cfg.dtype, "train_s": sum(r["time_step"] for r in h),
               "wall_s": time.perf_counter() - t0, "policy": policy_dir, "world_size": parallel.world()}
    if main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plot_run(run_dir)
    return summary


def main(args):
    cfg = Config.load(args.config)
    check(cfg)
    parallel.check_algo(cfg)
    if cfg.iterate is not None:
        if args.resume:
            raise ConfigError("iterate: an iterated run is not checkpointed, so --resume cannot continue it")
        from rlhf_trainer import iterate_hf
        with RunDirectory(args.out, False, args.overwrite, "train", checkpoint=None) as run_dir:
            iterate_hf.print_table(iterate_hf.run(cfg, run_dir, progress=not args.no_progress,
                                                  config_dir=os.path.dirname(os.path.abspath(args.config)))[1],
                                   run_dir)
        return 0
    with RunDirectory(args.out, args.resume, args.overwrite, "train") as run_dir:  # rank 0's, under torchrun
        summary = run(cfg, run_dir, resume=args.resume, progress=not args.no_progress,
                      config_dir=os.path.dirname(os.path.abspath(args.config)))
    if not parallel.is_main():
        return 0
    print("score %.4f -> %.4f over %d steps, KL per sequence %.3f; %.1f s" % (
        summary["score_start"], summary["score_end"], summary["steps"], summary["kl_seq_sum_end"], summary["wall_s"]))
    print("final policy: %s" % summary["policy"])
    print("run directory: %s" % run_dir)
    return 0
