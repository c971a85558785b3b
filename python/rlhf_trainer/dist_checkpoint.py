"""Checkpoints of a run under torchrun: a folder written with ``torch.distributed.checkpoint``.

    checkpoint/             the models' and optimizers' shards (DCP: one file per rank, and
                            .metadata, which maps every tensor to its pieces)
    checkpoint/trainer.pt   written by rank 0: step, history, schedulers, the KL controller,
                            the shared generator (prompts, minibatch order), the config, world size
    checkpoint/rng-<r>.pt   rank r's sampling RNGs

DCP reshards on load, so the folder resumes at any world size: exactly at the one that wrote it
(every rank gets its own RNGs back), and at another one with each rank's sampling RNG seeded from
(seed, step, rank). A one-process run (``python -m``) resumes from the folder too, and a run
under torchrun from a one-process ``checkpoint.pt`` (its full state dicts are sharded on load).
"""

import os
import random
import shutil

import numpy as np
import torch

from rlhf_trainer import parallel

FOLDER = "checkpoint"


def _models(trainer):
    out = [("policy", trainer.policy, trainer.opt_policy, trainer.sched_policy)]
    if trainer.uses_critic:
        out.append(("value", trainer.value, trainer.opt_value, trainer.sched_value))
    return out


def _local_rng(device):
    s = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "numpy_rng": np.random.get_state()}
    if device.type == "cuda":
        s["cuda_rng"] = torch.cuda.get_rng_state(device)
    return s


def save(trainer, path):
    """Writes the folder ``path`` (every rank calls it): to path.tmp, then renamed by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = path.rstrip("/") + ".tmp"
    if parallel.is_main() and os.path.exists(tmp):
        shutil.rmtree(tmp)
    parallel.barrier()
    state = {}
    for name, model, opt, _ in _models(trainer):
        state[name], state["opt_" + name] = get_state_dict(model, opt)
    dcp.save(state, checkpoint_id=tmp)
    torch.save(_local_rng(trainer.device), os.path.join(tmp, "rng-%d.pt" % parallel.rank()))
    if parallel.is_main():
        meta = {"step": trainer.step, "history": trainer.history, "config": trainer.cfg.to_dict(),
                "kl_ctl": trainer.kl_ctl.state_dict(), "gen": trainer.gen.get_state(),
                "world_size": parallel.world(),
                **{"sched_" + name: sched.state_dict() for name, _, _, sched in _models(trainer)}}
        torch.save(meta, os.path.join(tmp, "trainer.pt"))
    parallel.barrier()
    if parallel.is_main():   # never leave a half-written checkpoint under the final name
        old = path.rstrip("/") + ".old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()


def _by_name(osd, model):
    """A one-process optimizer state dict (parameters by index) keyed by parameter name, as
    torch.distributed.checkpoint.state_dict takes it."""
    names = [n for n, _ in model.named_parameters()]
    return {"state": {names[i]: st for i, st in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


def load(trainer, path):
    """Restores the trainer from the folder ``path`` (or, under torchrun, from a one-process
    checkpoint.pt at ``path``); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    if os.path.isdir(path):
        import torch.distributed.checkpoint as dcp
        meta = torch.load(os.path.join(path, "trainer.pt"), weights_only=False, map_location="cpu")
        state = {}
        for name, model, opt, _ in _models(trainer):
            state[name], state["opt_" + name] = get_state_dict(model, opt)
        dcp.load(state, checkpoint_id=path, no_dist=not parallel.active())
        opts = None
    else:   # a one-process checkpoint.pt: full state dicts, sharded by set_state_dict
        meta = torch.load(path, weights_only=False, map_location="cpu")
        meta["world_size"] = 1
        state = {}
        for name, model, _, _ in _models(trainer):
            state[name], state["opt_" + name] = meta[name], _by_name(meta["opt_" + name], model)
        opts = StateDictOptions(full_state_dict=True)
    if meta["config"] != trainer.cfg.to_dict():
        raise ValueError("checkpoint %s was written with another configuration" % path)
    for name, model, opt, sched in _models(trainer):
        # how this run's optimizer steps (foreach under FSDP2: parallel.adam_options) is not state:
        # loading would take the writer's choice, which another world size may not share
        foreach = [g.get("foreach") for g in opt.param_groups]
        set_state_dict(model, opt, model_state_dict=state[name], optim_state_dict=state["opt_" + name],
                       **({"options": opts} if opts else {}))
        for g, f in zip(opt.param_groups, foreach):
            g["foreach"] = f
        sched.load_state_dict(meta["sched_" + name])
    trainer.step, trainer.history = meta["step"], meta["history"]
    trainer.kl_ctl.load_state_dict(meta["kl_ctl"])
    trainer.gen.set_state(meta["gen"])
    own = os.path.join(path, "rng-%d.pt" % parallel.rank()) if os.path.isdir(path) else None
    if meta["world_size"] == parallel.world() and (own is None or os.path.exists(own)):
        s = meta if own is None else torch.load(own, weights_only=False)
        torch.set_rng_state(s["torch_rng"])
        random.setstate(s["python_rng"])
        np.random.set_state(s["numpy_rng"])
        if "cuda_rng" in s and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"], trainer.device)
    else:   # another world size: the ranks' streams are new ones (the run continues, not bitwise)
        torch.manual_seed(parallel.rank_seed(trainer.cfg.seed, trainer.step))
    from rlhf_trainer.runstate import rewrite_log
    rewrite_log(trainer.run_dir, trainer.history)


def find(run_dir):
    """The checkpoint a resumed run continues from: under torchrun the folder, else checkpoint.pt;
    either one when only it exists. None when there is none."""
    folder, single = os.path.join(run_dir, FOLDER), os.path.join(run_dir, "checkpoint.pt")
    order = [folder, single] if parallel.active() else [single, folder]
    return next((p for p in order if os.path.exists(p)), None)


def target(run_dir):
    """Where this run writes its checkpoint."""
    return os.path.join(run_dir, FOLDER if parallel.active() else "checkpoint.pt")
