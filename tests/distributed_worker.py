"""Run by tests/test_distributed_trainer.py, in one plain process or under torchrun:

    distributed_worker.py invariance OUT    one PPO update (with a value model) and one GRPO
        update on a fixed experience batch, with micro-batching. One plain process samples the
        rollouts and saves them (OUT/rollout-<algo>.pt); under torchrun each rank scores its rows
        of the saved rollouts. Either way, rank 0 saves the advantages, the gradients and the
        parameters after the step (OUT/<algo>-<world>.pt).
    distributed_worker.py resume OUT        4 PPO steps straight; then 2 steps, a checkpoint, a
        step that is lost, a fresh trainer that loads the checkpoint and 2 more steps: rank 0
        writes both logs' rows (OUT/resume-<world>.json) and the parameters at the checkpoint.
    distributed_worker.py continue OUT SRC  a fresh trainer loads the checkpoint SRC (written at
        another world size) and takes 2 steps (OUT/continue-<world>.json, the loaded parameters).
    distributed_worker.py raise OUT         rank 1 raises after the process group is up.
"""

import json

import os
import sys

import torch

from rlhf_trainer import dist_checkpoint, parallel
from rlhf_trainer.algos import trainer_class
from rlhf_trainer.toy import ToyTask
from _helpers import toy_config  # this script's folder, tests/, is first on sys.path

OPTIONS = {"ppo": dict(loss_agg="token-mean", entropy_coef=0.01),
           "grpo": dict(group_size=4)}


def full(t):
    """The whole tensor of a (possibly sharded) parameter or gradient."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def invariance(out):
    for algo, extra in OPTIONS.items():
        cfg = toy_config(algo, dict(steps=1, rollout_batch=16, minibatch=16, micro_batch=2, epochs=1,
                                    max_grad_norm=1e9, **extra))
        task = ToyTask(cfg.task)
        trainer = trainer_class(algo)(cfg, task, reward_fn=task.rule_reward, log=lambda *a: None)
        path = os.path.join(out, "rollout-%s.pt" % algo)
        if not parallel.active():
            torch.save(trainer.rollout(), path)
        prompt_ids, prompts, responses = torch.load(path)
        rows = parallel.share(len(prompt_ids), "rollout")
        batch = trainer.score_rollout(prompt_ids[rows], prompts[rows], responses[rows])
        batch = {k: parallel.gather_rows(v) if torch.is_tensor(v) else v for k, v in batch.items()}
        stats = trainer.update(batch)
        models = [trainer.policy] + ([trainer.value] if trainer.uses_critic else [])
        grads = [full(p.grad) for m in models for p in m.parameters() if p.grad is not None]
        params = [full(p.detach()) for m in models for p in m.parameters()]
        if parallel.is_main():
            torch.save({"advantages": batch["advantages"], "grads": grads, "params": params, "stats": stats},
                       os.path.join(out, "%s-%d.pt" % (algo, parallel.world())))


def small_trainer(run_dir):
    cfg = toy_config("ppo", dict(steps=4, rollout_batch=16, minibatch=8, micro_batch=4, epochs=2))
    task = ToyTask(cfg.task)
    if parallel.is_main():
        os.makedirs(run_dir, exist_ok=True)
    return trainer_class("ppo")(cfg, task, reward_fn=task.rule_reward, run_dir=run_dir, log=lambda *a: None)


def rows(trainer):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in trainer.history]


def policy_params(trainer):
    return [full(p.detach()).clone() for p in trainer.policy.parameters()]


def resume(out):
    w = parallel.world()
    straight = small_trainer(os.path.join(out, "straight-%d" % w))
    for _ in range(4):
        straight.train_step()
    first = small_trainer(os.path.join(out, "resumed-%d" % w))
    for _ in range(2):
        first.train_step()
    ckpt = os.path.join(out, "ckpt-%d" % w + ("" if parallel.active() else ".pt"))
    first.save(ckpt)
    at_checkpoint = policy_params(first)
    if parallel.is_main():
        torch.save(at_checkpoint, os.path.join(out, "params-%d.pt" % w))
    first.train_step()                       # lost: the resumed run redoes it
    torch.manual_seed(12345)                 # and the process's RNG has moved on
    resumed = small_trainer(os.path.join(out, "resumed-%d" % w))
    resumed.load(ckpt)
    for _ in range(2):
        resumed.train_step()
    if parallel.is_main():
        json.dump({"straight": rows(straight), "resumed": rows(resumed)}, open(os.path.join(out, "resume-%d.json" % w), "w"))


def continue_from(out, src):
    w = parallel.world()
    trainer = small_trainer(os.path.join(out, "continued-%d" % w))
    trainer.load(src)
    loaded = policy_params(trainer)
    for _ in range(2):
        trainer.train_step()
    if parallel.is_main():
        torch.save(loaded, os.path.join(out, "loaded-%d.pt" % w))
        json.dump(rows(trainer), open(os.path.join(out, "continue-%d.json" % w), "w"))
        json.dump([g.get("foreach") for _, _, opt, _ in dist_checkpoint._models(trainer) for g in opt.param_groups],
                  open(os.path.join(out, "foreach-%d.json" % w), "w"))


def main():
    what, out = sys.argv[1], sys.argv[2]
    parallel.start()
    if what == "invariance":
        invariance(out)
    elif what == "resume":
        resume(out)
    elif what == "continue":
        continue_from(out, sys.argv[3])
    elif what == "raise":
        parallel.init(torch.device("cpu"))
        if parallel.rank() == 1:
            parallel.abort("ValueError: a reward function failed")
            raise ValueError("a reward function failed")
        parallel.barrier()       # rank 0 waits here for a peer that never comes
    parallel.finish()


if __name__ == "__main__":
    main()
