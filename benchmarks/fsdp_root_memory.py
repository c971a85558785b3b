"""The memory FSDP2 on gloo (CPU) takes to gather and reduce one tied embedding/LM head of
Qwen2.5-0.5B's size (151936 x 896, float32: 0.51 GiB), the part of the bench's 0.5B model per
rank that does not shrink with the number of processes (docs/distributed.md).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 benchmarks/fsdp_root_memory.py

Each rank prints its resident set after sharding, then the peak resident set (VmHWM, reset
through /proc/self/clear_refs after freed heap is returned) over that start for a forward
without gradients (the all-gather) and for a forward and backward (the all-gather and the
gradient's reduce-scatter). Linux only (/proc).
"""

import ctypes
import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

VOCAB, HIDDEN, TOKENS = 151936, 896, 32


def status(field):
    """/proc/self/status's field in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    raise KeyError(field)


def reset():
    """Return freed heap, reset the peak to the current resident set -> that set (GiB)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


class Root(nn.Module):
    """An embedding whose weight is also the LM head's, as Qwen2.5-0.5B's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Root()
    fully_shard(model, reshard_after_forward=True)
    ids = torch.randint(0, VOCAB, (1, TOKENS))
    lines = ["weight %.2f GiB; sharded: resident %.2f GiB" % (VOCAB * HIDDEN * 4 / 2 ** 30, reset())]
    start = reset()
    with torch.no_grad():
        model(ids)
    lines.append("forward without gradients (gather): peak %+.2f GiB" % (status("VmHWM") - start))
    for what in ("forward + backward (gather, reduce-scatter)", "again (the gradient accumulates)"):
        start = reset()
        model(ids).logsumexp(-1).sum().backward()
        lines.append("%s: peak %+.2f GiB, after %+.2f GiB" % (what, status("VmHWM") - start, status("VmRSS") - start))
    for r in range(dist.get_world_size()):
        dist.barrier()
        if r == dist.get_rank():
            print("rank %d: %s" % (r, "; ".join(lines)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
