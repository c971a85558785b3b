"""Data parallelism under torchrun: the process group, rank-0-only output, global reductions,
FSDP2 sharding and a clean stop of every rank when one fails.

``python -m rlhf_trainer ...`` has no process group: every helper here is then the identity (or
a no-op) and the trainer runs exactly as it always has. Under ``torchrun`` (``WORLD_SIZE`` in the
environment) ``init()`` joins the group torchrun describes: NCCL on CUDA, gloo on the CPU, each
rank on the GPU ``LOCAL_RANK``.
"""

import gc
import os
import sys
import threading
import time
import types

import torch
import torch.distributed as dist

ABORT_KEY = "rlhf_trainer/abort"
_state = types.SimpleNamespace(mesh=None, watchdog=None, done=False)


def launched():
    """True in a process started by torchrun (its environment names a world)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device):
    """Joins torchrun's process group (once) and returns the device this rank runs on: ``device``
    (from the config's ``device:``) with CUDA's index taken from LOCAL_RANK. Without torchrun:
    ``device`` unchanged, no group."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _start_watchdog()
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
    """gloo reduces CPU tensors, NCCL CUDA ones."""
    return t.cuda() if dist.get_backend() == "nccl" else t.cpu()


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


def shard(model, dtype="float32", reshard_after_forward=True, offload=False):
    """FSDP2 on ``model``: each decoder layer, then the root; bf16 parameters with float32
    gradient reduction when dtype is bfloat16. Without a group: ``model`` unchanged."""
    model.rlhf_call = types.MethodType(_call, model)
    if not active():
        return model
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    kw = {"mesh": _state.mesh, "reshard_after_forward": reshard_after_forward}
    if dtype == "bfloat16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in _layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    # the loss is a sum over every rank's tokens over the global count: sum the gradients, not average
    model.set_gradient_divide_factor(1.0)
    register_fsdp_forward_method(model, "rlhf_call")
    return model


def sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


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
    (``abort``), so no rank waits in a collective for a peer that has gone."""
    store = _store()

    def watch():
        while not _state.done:
            time.sleep(0.5)
            try:
                if store.check([ABORT_KEY]):
                    msg = store.get(ABORT_KEY).decode()
                    if is_main():
                        print("stopped: %s" % msg, file=sys.stderr, flush=True)
                    os._exit(1)
            except Exception:   # the store is gone: rank 0 has ended, so the run is over
                if not _state.done:
                    os._exit(1)
    t = threading.Thread(target=watch, daemon=True, name="rlhf_trainer-abort-watch")
    t.start()
    _state.watchdog = t


def abort(message):
    """Tells every rank that this one failed (each then exits with code 1)."""
    if not active():
        return
    try:
        _store().set(ABORT_KEY, "rank %d failed: %s" % (rank(), message))
    except Exception:
        pass


def finish():
    """Leaves the process group at the end of a run."""
    if active():
        dist.barrier()
        _state.done = True
        dist.destroy_process_group()
