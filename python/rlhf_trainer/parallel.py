"""Data parallelism under torchrun: the process group, rank-0-only output, global reductions,
FSDP2 sharding and a clean stop of every rank when one fails.

``python -m rlhf_trainer ...`` has no process group: every helper here is then the identity (or
a no-op) and the trainer runs exactly as it always has. Under ``torchrun`` (``WORLD_SIZE`` in the
environment) ``init()`` joins the group torchrun describes: NCCL on CUDA, gloo on the CPU, each
rank on the GPU ``LOCAL_RANK``.
"""

import atexit
import gc
import os
import sys
import threading
import time
import types
import warnings

import torch
import torch.distributed as dist

ABORT_KEY = "rlhf_trainer/abort"
_state = types.SimpleNamespace(mesh=None, watchdog=None, done=False)


def launched():
    """True in a process started by torchrun (its environment names a world)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def start():
    """Joins torchrun's process group (gloo for CPU tensors, NCCL for CUDA ones when torch sees a
    GPU) and starts the watch for another rank's failure; a no-op without torchrun or when joined."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    _start_watchdog()


def init(device):
    """The device this rank runs on: ``device`` (from the config's ``device:``) with CUDA's index
    taken from LOCAL_RANK, after joining the group (``start``). Without torchrun: ``device``
    unchanged, no group."""
    if not launched():
        return device
    start()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if _state.mesh is None:
        from torch.distributed.device_mesh import init_device_mesh
        _state.mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return device


def active():
    """A process group with more than zero ranks is up (torchrun, after init)."""
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def group():
    """The process group the statistics span (None without torchrun: the local batch is the batch)."""
    return dist.group.WORLD if active() else None


def main_only(log):
    """``log`` on rank 0, a no-op on the other ranks."""
    return log if is_main() else (lambda *a, **k: None)


def barrier():
    if active():
        dist.barrier()


def broadcast(obj):
    """rank 0's ``obj`` on every rank (a picklable object: a run directory, a decision)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm(t):
    """t where the group's backend reduces it: gloo CPU tensors, NCCL CUDA ones (both kept
    where both are set up)."""
    b = str(dist.get_backend())
    return t.cpu() if "nccl" not in b else t.cuda() if "gloo" not in b else t


def all_sum(values):
    """Elementwise sums over ranks of a list of floats (float64): counts and metric sums."""
    if not active():
        return list(values)
    t = _comm(torch.tensor(list(values), dtype=torch.float64))
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_max(values):
    """Elementwise maxima over ranks of a list of floats."""
    if not active():
        return list(values)
    t = _comm(torch.tensor(list(values), dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def gather_rows(t):
    """The rows of every rank's ``t`` in rank order (dim 0 concatenated; every rank's t has one
    shape). The identity without a group."""
    if not active():
        return t
    dev, dtype = t.device, t.dtype
    x = _comm(t.to(torch.uint8) if dtype == torch.bool else t).contiguous()
    out = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(out, x)
    return torch.cat(out).to(dev, dtype)


def share(n, what):
    """This rank's contiguous slice of n rows (n divisible by the world size, else ValueError)."""
    w = world()
    if n % w:
        raise ValueError("%s=%d is not divisible by the number of processes (%d)" % (what, n, w))
    k = n // w
    return slice(rank() * k, (rank() + 1) * k)


def check_split(algo, section, group_size=1):
    """The rollout, each minibatch and each group split evenly over the ranks (ConfigError otherwise)."""
    from rlhf_trainer.config import ConfigError
    w = world()
    if w == 1:
        return
    for name, n in (("rollout_batch", section.rollout_batch), ("minibatch", section.minibatch)):
        if n % w:
            raise ConfigError("%s.%s=%d is not divisible by the number of processes (%d)" % (algo, name, n, w))
    if (section.rollout_batch // group_size) % w:
        raise ConfigError("%s.rollout_batch=%d holds %d groups of %s.group_size=%d, not divisible by the number of "
                          "processes (%d): a group is never split across ranks"
                          % (algo, section.rollout_batch, section.rollout_batch // group_size, algo, group_size, w))


def check_algo(cfg):
    """Under torchrun only the policy-gradient trainers run data-parallel (ConfigError otherwise)."""
    from rlhf_trainer.config import POLICY_GRADIENT, ConfigError
    if world() > 1 and (cfg.algo not in POLICY_GRADIENT or cfg.iterate is not None):
        raise ConfigError("under torchrun (%d processes) algo must be one of %s without an iterate section, got "
                          "algo: %s%s; run it with python -m rlhf_trainer" % (world(), ", ".join(POLICY_GRADIENT),
                                                                             cfg.algo, " with iterate" if cfg.iterate
                                                                             is not None else ""))


def rank_seed(seed, step):
    """The seed of this rank's sampling RNG (rank 0 keeps the one-process stream)."""
    return seed + 2 + 7919 * rank() + 104729 * step


def options(cfg):
    """The config's ``parallel`` section, or its defaults."""
    from rlhf_trainer.config import ParallelSection
    return getattr(cfg, "parallel", None) or ParallelSection()


def one_at_a_time(fn):
    """fn() on each rank in turn (rank 0 first), so a node never holds more than one rank's
    full, not yet sharded copy of the weights in host memory at once."""
    out = None
    for r in range(world()):
        if r == rank():
            out = fn()
            gc.collect()
        barrier()
    return out


# ---------- FSDP2 ----------
def _layers(model):
    """The decoder layers: the modules whose class the model names as unsplittable."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _call(self, fn, *args, **kwargs):
    """fn(self, ...) as a forward of the FSDP root: its parameters are gathered inside (used for
    the fused LM head, which reads the backbone's hidden states and the head's weight)."""
    return fn(self, *args, **kwargs)


def shard(model, dtype="float32", reshard_after_forward=True, offload=False, root_inputs=True):
    """FSDP2 on ``model``: each decoder layer, then the root; bf16 parameters with float32
    gradient reduction when dtype is bfloat16 (``root_inputs=False``: the root's float inputs are
    not cast, as the fused LM head passes it float32 advantages). Without a group: ``model``
    unchanged."""
    if not active():
        return model
    model.rlhf_call = types.MethodType(_call, model)
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    kw = {"mesh": _state.mesh, "reshard_after_forward": reshard_after_forward}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    mp = lambda cast: MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=cast)  # noqa: E731
    for layer in _layers(model):
        fully_shard(layer, **kw, **({"mp_policy": mp(True)} if dtype == "bfloat16" else {}))
    fully_shard(model, **kw, **({"mp_policy": mp(root_inputs)} if dtype == "bfloat16" else {}))
    # the loss is a sum over every rank's tokens over the global count: sum the gradients, not
    # average them (each layer's FSDP module and the root's); a plain sum, as gloo has no scaled one
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    register_fsdp_forward_method(model, "rlhf_call")
    # the scalar-head models return a slice of their output (read-only downstream)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def adam_options(model):
    """Keyword arguments for the model's Adam/AdamW: under FSDP2 the parameters are DTensors, for
    which torch picks the per-parameter loop (each update op dispatched through DTensor, one
    parameter at a time); ``foreach=True`` updates a rank's shards in a few multi-tensor ops
    (measured on the CPU, 2 gloo processes, a 2-layer GPT-2: 106 ms -> 18 ms per step). One
    process keeps torch's own choice, so single-process runs are unchanged."""
    return {"foreach": True} if sharded(model) else {}


def full_state_dict(model):
    """The whole model's state dict, on rank 0 (empty elsewhere), on the CPU."""
    if not sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model, folder, log=print):
    """A normal ``save_pretrained`` folder of a (possibly sharded) Hugging Face model, written by rank 0."""
    sd = full_state_dict(model)
    if is_main():
        model.save_pretrained(folder, state_dict=sd)
        if sharded(model):   # FSDP2 renames the class to FSDP<name>: the folder names the model's own
            import json
            path = os.path.join(folder, "config.json")
            with open(path) as f:
                c = json.load(f)
            c["architectures"] = [a[4:] if a.startswith("FSDP") else a for a in c.get("architectures") or []]
            with open(path, "w") as f:
                json.dump(c, f, indent=2)
    barrier()


# ---------- one failure stops every rank ----------
def _store():
    from torch.distributed.distributed_c10d import _get_default_store
    return _get_default_store()


def _start_watchdog():
    """A thread that ends this process within a second once another rank has reported an error
    (``abort``), so no rank waits in a collective for a peer that has gone. It is stopped and
    joined before the process group goes (``finish``) and at exit: a daemon thread still inside a
    store call when the interpreter finalizes is killed by a forced unwind through C++ frames,
    which aborts the process ("terminate called without an active exception")."""
    store = _store()
    stop = threading.Event()

    def watch():
        while not stop.wait(0.5):
            try:
                if store.check([ABORT_KEY]):
                    msg = store.get(ABORT_KEY).decode()
                    if is_main():
                        print("stopped: %s" % msg, file=sys.stderr, flush=True)
                    os._exit(1)
            except Exception:   # the store is gone: rank 0 has ended, so the run is over
                if not (_state.done or stop.is_set()):
                    os._exit(1)
    t = threading.Thread(target=watch, daemon=True, name="rlhf_trainer-abort-watch")
    t.start()
    _state.watchdog = (t, stop)
    atexit.register(_stop_watchdog)


def _stop_watchdog():
    """Stops the watch thread and waits for it (at most one store round trip)."""
    _state.done = True
    if _state.watchdog is None:
        return
    t, stop = _state.watchdog
    stop.set()
    if t is not threading.current_thread():
        t.join(timeout=10)
    _state.watchdog = None


def abort(message):
    """Tells every rank that this one failed (each then exits with code 1). True when this rank
    is the first to fail (it prints the message; the others stay quiet)."""
    if not active():
        return True
    _stop_watchdog()     # this rank's own watch stands down: it reports and exits by itself
    try:
        mine = "rank %d failed: %s" % (rank(), message)
        return _store().compare_set(ABORT_KEY, "", mine).decode() == mine
    except Exception:
        return True


def finish():
    """Leaves the process group at the end of a run."""
    if active():
        dist.barrier()
        _stop_watchdog()
        dist.destroy_process_group()
