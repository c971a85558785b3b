"""Benchmark of the vocabulary-parallel (tensor-parallel) ops: ``process_group=`` on
token_logprobs and linear_policy_loss, against two baselines written here.

CPU (--device cpu): 2 and 4 gloo processes (torch.multiprocessing spawn, file init, one thread
each) on one machine; every rank holds [N, V/TP] logits (or the [V/TP, H] slice of the LM head).
Per call, forward and backward: the collectives and the bytes each rank puts into them (counted
by a dispatch mode that sees every c10d op), and the median wall time of rank 0 between two
barriers (so one barrier's latency is in every figure), for
  ours_logprobs    token_logprobs(logits, labels, process_group=...): one all-gather of O(N)
                   float32 per-row statistics, nothing saved of size [N, V/TP], no collective in
                   the backward
  gather_logits    all-gather the [N, V/TP] logits into [N, V] on every rank, then
                   token_logprobs on the whole vocabulary (backward: the rank's slice of the
                   whole gradient, no collective)
  megatron_3ar     Megatron-core's vocab_parallel_cross_entropy recipe: all-reduce (max) of the
                   row max, all-reduce (sum) of the target logit, all-reduce (sum) of the sum of
                   exps; saves the float32 softmax [N, V/TP] for the backward (no collective)
  ours_policy      linear_policy_loss(hidden, weight slice, ..., process_group=...): statistics
                   pass, one all-gather, the loss on [B, T], then the gradient pass in the
                   backward (8NHV/TP FLOPs)
All three log-prob providers compute logp only (no entropy), fp32 logits.

GPU (--device cuda): ONE device, per-rank kernel time of the V/TP slice at V = 151936, N = 16384,
H = 4096, bf16, TP = 1, 2, 4, 8: each op runs with process_group= a "fake" group of TP ranks
(torch.testing's FakeProcessGroup in this one process), whose all-gather only copies this rank's
rows: every kernel, combine and copy of a rank runs, the collective's communication is EXCLUDED.
TP = 1 is the single-device op (no group). validate=False (no label read-back), CUDA-event
medians. Rows: token_logprobs (fwd, fwd+bwd of logp.sum()) on [N, V/TP] logits, and
linear_policy_loss (fwd, fwd+bwd) with the [V/TP, H] head slice; TFLOP/s of linear_policy_loss
on what it multiplies: 6NHV at TP = 1 (gradients made in the forward), 8NHV/TP above.

    python benchmarks/bench_vocab_parallel.py                  # CPU, gloo, TP = 2 and 4
    python benchmarks/bench_vocab_parallel.py --device cuda    # one GPU, TP = 1, 2, 4, 8
"""

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import fmt_time, median_time, print_table, write_csv  # noqa: E402


class Collectives(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every c10d collective dispatched inside: (op name, bytes this rank puts in)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns in ("c10d", "_c10d_functional") and not name.startswith(("wait", "barrier")):
            sent = args[1] if ns == "c10d" and "allgather" in name else args[0]
            leaves = torch.utils._pytree.tree_leaves(sent)
            self.calls.append((name, sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))))
        return func(*args, **(kwargs or {}))


# ---- the baselines: logits [N, V_local] (float32), labels [N] global -> logp [N] ----

class _GatherLogits(torch.autograd.Function):
    """All-gather the logits along the vocabulary: [N, V_local] -> [N, V]; the backward keeps this
    rank's columns of the whole gradient (no collective)."""

    @staticmethod
    def forward(ctx, z, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(z) for _ in range(world)]
        dist.all_gather(parts, z.contiguous(), group=group)
        ctx.cols = (rank * z.shape[1], z.shape[1])
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, g):
        start, n = ctx.cols
        return g.narrow(1, start, n), None


def gather_logits(rk, z, y, group):
    return rk.token_logprobs(_GatherLogits.apply(z, group), y)


class _Megatron3(torch.autograd.Function):
    """Megatron-core's vocab_parallel_cross_entropy recipe as log-probs: three all-reduces (row
    max, target logit, sum of exps), the float32 softmax [N, V_local] saved for the backward."""

    @staticmethod
    def forward(ctx, z, y, group):
        rank, v_local = dist.get_rank(group), z.shape[1]
        z = z.float()
        m = z.amax(1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m[:, None]
        start = rank * v_local
        mine = (y >= start) & (y < start + v_local)
        local = torch.where(mine, y - start, 0)
        target = torch.where(mine, z.gather(1, local[:, None])[:, 0], 0.0)
        dist.all_reduce(target, group=group)
        e = z.exp()
        sum_exp = e.sum(1)
        dist.all_reduce(sum_exp, group=group)
        softmax = e.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, local, mine)
        return target - sum_exp.log()

    @staticmethod
    def backward(ctx, g):
        softmax, local, mine = ctx.saved_tensors
        grad = softmax.mul_(-g[:, None])  # d logp / dz = onehot - softmax (in place, as Megatron)
        rows = torch.arange(grad.shape[0])
        grad[rows, local] += torch.where(mine, g, 0.0)
        return grad, None, None


def megatron_3ar(rk, z, y, group):
    return _Megatron3.apply(z, y, group)


def ours_logprobs(rk, z, y, group):
    return rk.token_logprobs(z, y, process_group=group)


LOGPROB_PROVIDERS = {"ours_logprobs": ours_logprobs, "gather_logits": gather_logits, "megatron_3ar": megatron_3ar}


# ---- CPU: gloo processes ----

def _timed(fn, repeats):
    def step():
        dist.barrier()
        fn()
        dist.barrier()
    return median_time(step, warmup=1, repeats=repeats)


def _cpu_worker(rank, world, init_file, out_file, N, V, H, repeats):
    import rlhf_kernels as rk
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    group = dist.group.WORLD
    v_local = V // world
    gen = torch.Generator().manual_seed(rank)
    z = torch.randn(N, v_local, generator=gen) * 3
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))  # the same labels everywhere
    rows = []
    for name, fn in LOGPROB_PROVIDERS.items():
        for mode in ("fwd", "fwd+bwd"):
            leaf = z.clone().requires_grad_(mode == "fwd+bwd")

            def call():
                lp = fn(rk, leaf, y, group)
                if mode == "fwd+bwd":
                    lp.sum().backward()
                    leaf.grad = None
            fwd, bwd = Collectives(), Collectives()
            with fwd:
                lp = fn(rk, leaf, y, group)
            if mode == "fwd+bwd":
                with bwd:
                    lp.sum().backward()
            rows.append(dict(provider=name, tp=world, mode=mode, N=N, V=V, fwd=fwd.calls, bwd=bwd.calls,
                             seconds=_timed(call, repeats)))
    # the policy head: B x T = N tokens, the [V/TP, H] head slice
    B = 8
    hidden = torch.randn(B, N // B, H, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(v_local, H, generator=gen) * H ** -0.5
    y2 = y.view(B, N // B)
    old = torch.randn(B, N // B, generator=torch.Generator().manual_seed(2)) - 5
    adv = torch.randn(B, N // B, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, N // B, dtype=torch.bool)
    for mode in ("fwd", "fwd+bwd"):
        h = hidden.clone().requires_grad_(mode == "fwd+bwd")
        w = weight.clone().requires_grad_(mode == "fwd+bwd")

        def policy():
            return rk.linear_policy_loss(h, w, y2, old, adv, mask, entropy_coef=0.01, process_group=group)[0]

        def call():
            loss = policy()
            if mode == "fwd+bwd":
                loss.backward()
                h.grad = w.grad = None
        fwd, bwd = Collectives(), Collectives()
        with fwd:
            loss = policy()
        if mode == "fwd+bwd":
            with bwd:
                loss.backward()
        rows.append(dict(provider="ours_policy", tp=world, mode=mode, N=N, V=V, fwd=fwd.calls, bwd=bwd.calls,
                         seconds=_timed(call, repeats)))
    if rank == 0:
        torch.save(rows, out_file)
    dist.destroy_process_group()


def run_cpu(args):
    import torch.multiprocessing as mp
    records = []
    for world in args.tp:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "rows.pt")
            mp.spawn(_cpu_worker, args=(world, os.path.join(d, "init"), out, args.N, args.V, args.H, args.repeats),
                     nprocs=world, join=True)
            records += torch.load(out)
    table, csv_rows = [], []
    for r in records:
        n_f, n_b = len(r["fwd"]), len(r["bwd"])
        b_f, b_b = sum(b for _, b in r["fwd"]), sum(b for _, b in r["bwd"])
        kinds = ", ".join(sorted({k for k, _ in r["fwd"] + r["bwd"]}))
        table.append([r["provider"], r["tp"], r["mode"], "%d + %d" % (n_f, n_b), "%d + %d" % (b_f, b_b), kinds,
                      fmt_time(r["seconds"])])
        csv_rows.append(dict(provider=r["provider"], tp=r["tp"], mode=r["mode"], N=r["N"], V=r["V"], H=args.H,
                             collectives_fwd=n_f, collectives_bwd=n_b, bytes_fwd=b_f, bytes_bwd=b_b,
                             median_s=r["seconds"]))
    print_table("vocabulary-parallel on the CPU: gloo, N = %d, V = %d (H = %d for the policy head), fp32; "
                "collectives and bytes per rank per call (forward + backward); rank 0's median between barriers"
                % (args.N, args.V, args.H),
                ["provider", "TP", "mode", "collectives", "bytes put in", "ops", "time"], table)
    if args.csv:
        write_csv(args.csv, csv_rows)


# ---- GPU: one device, the per-rank kernels of each TP ----

def run_cuda(args):
    import rlhf_kernels as rk
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dev = "cuda"
    N, V, H, dt = args.N, args.V, args.H, torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    y = torch.randint(0, V, (N,), generator=gen, device=dev)
    B = 16
    table, csv_rows = [], []
    for tp in args.tp:
        if V % tp:
            raise ValueError("V = %d is not a multiple of TP = %d" % (V, tp))
        group = None
        if tp > 1:
            dist.init_process_group("fake", rank=0, world_size=tp, store=FakeStore())
            group = dist.group.WORLD
        v_local = V // tp
        try:
            z = torch.randn(N, v_local, generator=gen, device=dev, dtype=dt) * 3
            hidden = torch.randn(B, N // B, H, generator=gen, device=dev, dtype=dt)
            weight = torch.randn(v_local, H, generator=gen, device=dev, dtype=dt) * H ** -0.5
            old = torch.randn(B, N // B, generator=gen, device=dev) - 5
            adv = torch.randn(B, N // B, generator=gen, device=dev)
            mask = torch.ones(B, N // B, dtype=torch.bool, device=dev)
            for op in ("token_logprobs", "linear_policy_loss"):
                for mode in ("fwd", "fwd+bwd"):
                    grad = mode == "fwd+bwd"
                    if op == "token_logprobs":
                        leaf = z.clone().requires_grad_(grad)

                        def call():
                            lp = rk.token_logprobs(leaf, y, validate=False, process_group=group)
                            if grad:
                                lp.sum().backward()
                                leaf.grad = None
                        flops = 0
                    else:
                        h, w = hidden.clone().requires_grad_(grad), weight.clone().requires_grad_(grad)

                        def call():
                            loss = rk.linear_policy_loss(h, w, y.view(B, -1), old, adv, mask, entropy_coef=0.01,
                                                         validate=False, process_group=group)[0]
                            if grad:
                                loss.backward()
                                h.grad = w.grad = None
                        nhv = N * H * v_local
                        flops = 2 * nhv if not grad else (6 if tp == 1 else 8) * nhv
                    t = median_time(call, device=dev, warmup=2, repeats=args.repeats)
                    rate = "%.0f" % (flops / t / 1e12) if flops else ""
                    table.append([op, tp, v_local, mode, fmt_time(t), rate])
                    csv_rows.append(dict(op=op, tp=tp, N=N, V=V, V_local=v_local, H=H, mode=mode, median_s=t,
                                         tflops=flops / t / 1e12 if flops else ""))
                    del call
                    torch.cuda.empty_cache()
        finally:
            if group is not None:
                dist.destroy_process_group()
    print_table("per-rank kernel time of the V/TP slice on %s: N = %d, V = %d, H = %d, bf16; the collective "
                "EXCLUDED (a fake group of TP ranks in one process: every kernel and combine of a rank, no "
                "communication); validate=False" % (torch.cuda.get_device_name(0), N, V, H),
                ["op", "TP", "V/TP", "mode", "time", "TFLOP/s done"], table)
    if args.csv:
        write_csv(args.csv, csv_rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tp", type=int, nargs="+", default=None, help="TP sizes (cpu: 2 4; cuda: 1 2 4 8)")
    p.add_argument("--N", type=int, default=None, help="tokens (cpu 1024, cuda 16384)")
    p.add_argument("--V", type=int, default=None, help="the whole vocabulary (cpu 32768, cuda 151936)")
    p.add_argument("--H", type=int, default=None, help="hidden size of the policy head (cpu 256, cuda 4096)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.tp = args.tp or ([1, 2, 4, 8] if cuda else [2, 4])
    args.N = args.N or (16384 if cuda else 1024)
    args.V = args.V or (151936 if cuda else 32768)
    args.H = args.H or (4096 if cuda else 256)
    t0 = time.time()
    run_cuda(args) if cuda else run_cpu(args)
    print("\n(%.0f s)" % (time.time() - t0))


if __name__ == "__main__":
    main()
