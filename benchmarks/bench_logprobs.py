"""Benchmark of token_logprobs (log-probability of the label and entropy per token).

Providers:
  eager      torch: log_softmax + gather + entropy = -(p * logp).sum(-1), in float32
  compile    torch.compile of `eager`
  row_loop   the per-row loop popular trainers use to save memory (selective log-softmax:
             log_softmax one row at a time), written here with the entropy added
  liger      Liger-Kernel's fused cross-entropy (logp = -CE per token; no entropy), when importable
  cpu / triton / cuda   rlhf_kernels.token_logprobs(..., return_entropy=True, backend=...)
Modes: fwd (no autograd) and fwd+bwd (backward of logp.sum() + entropy.sum() to the logits).

Inputs are made on the device by a seeded generator there (never drawn on the CPU and copied).
On the CPU every (provider, mode) runs in a fresh subprocess, so that peak memory is that
provider's own; on a GPU they all run in this process (CUDA's allocator statistics isolate them).
Peak extra memory: on CUDA, torch.cuda.max_memory_allocated() over the inputs; on the CPU,
the peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the resident
size before the measured call. "beyond grad" subtracts the [N, V] gradient that fwd+bwd must
produce. GB/s counts the bytes a fused kernel must move: fwd reads the logits once; fwd+bwd
reads them twice and writes the gradient once. The floor is those bytes at the copy bandwidth
measured in the same run (clone of the logits: one read + one write).

    python benchmarks/bench_logprobs.py                       # this machine: the CPU target shape
    python benchmarks/bench_logprobs.py --device cuda          # bf16 N=16384 V=152064 (H100 target)
"""

import argparse
import csv
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import fmt_time, measure_here, median_time, peak_extra_bytes, print_table, run_child  # noqa: E402

PROVIDERS = ["eager", "compile", "row_loop", "liger", "cpu", "triton", "cuda"]
MODES = ["fwd", "fwd+bwd"]


# ---- the providers ----

def eager(x, y):
    logp_all = torch.log_softmax(x.float(), dim=-1)
    logp = logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def row_loop(x, y):
    logps, ents = [], []
    for row, label in zip(x, y):
        lp = torch.log_softmax(row.float(), dim=-1)
        logps.append(lp[label])
        ents.append(-(lp.exp() * lp).sum())
    return torch.stack(logps), torch.stack(ents)


def make_provider(name):
    if name == "eager":
        return eager
    if name == "compile":
        return torch.compile(eager)
    if name == "row_loop":
        return row_loop
    if name == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss
        ce = LigerCrossEntropyLoss(reduction="none")

        def liger(x, y):
            logp = -ce(x, y)
            return logp, torch.zeros_like(logp)
        return liger
    import rlhf_kernels as rk

    def ours(x, y):
        return rk.token_logprobs(x, y, return_entropy=True, backend=name)
    return ours


def unavailable(name, device):
    """None if the provider can run here, else why not."""
    if name == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "Liger-Kernel is not installed"
        if device != "cuda":
            return "Liger-Kernel needs a GPU"
    if name in ("cpu", "triton", "cuda"):
        from rlhf_kernels import _backend
        if name == "triton" and device == "cpu":
            return "Triton runs on a GPU (the CPU interpreter is for tests)"
        return _backend.why_not(name, device)
    if name == "row_loop" and device == "cpu":
        return None
    return None


# ---- one measurement, in a fresh process ----

def measure(provider, mode, device, dtype, N, V, repeats):
    dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, V, generator=gen, device=device, dtype=dtype) * 3
    y = torch.randint(0, V, (N,), generator=gen, device=device)
    fn = make_provider(provider)
    if mode == "fwd+bwd":
        x.requires_grad_(True)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(x, y)
        else:
            x.grad = None
            logp, ent = fn(x, y)
            (logp.sum() + ent.sum()).backward()

    step()  # warm-up: compiles, autotunes, faults in pages
    x.grad = None
    peak = peak_extra_bytes(step, device)
    seconds = median_time(step, device=device, warmup=1, repeats=repeats)
    # bandwidth of this device, same run: a clone reads and writes the logits once
    xd = x.detach()
    copy_s = median_time(lambda: xd.clone(), device=device, warmup=2, repeats=max(repeats, 5))
    return {"seconds": seconds, "peak": peak, "copy_gbps": 2 * xd.numel() * xd.element_size() / copy_s / 1e9}


# ---- the driver ----

def run_one(provider, mode, args):
    if args.device == "cuda":
        return measure_here(measure, provider, mode, args.device, args.dtype, args.N, args.V, args.repeats)
    return run_child(os.path.abspath(__file__), provider, mode, dict(device=args.device, dtype=args.dtype, N=args.N,
                                                                   V=args.V, repeats=args.repeats))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--N", type=int, default=None)
    p.add_argument("--V", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--child", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.N = args.N or (2048 if cpu else 16384)
    args.V = args.V or (32000 if cpu else 152064)

    if args.child:
        torch.set_num_threads(torch.get_num_threads())
        print(json.dumps(measure(*args.child, args.device, args.dtype, args.N, args.V, args.repeats)))
        return

    elt = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    logits_bytes = args.N * args.V * elt
    results = {}
    rows = []
    for mode in args.modes.split(","):
        floor_bytes = logits_bytes * (1 if mode == "fwd" else 3)
        grad_bytes = 0 if mode == "fwd" else logits_bytes
        for provider in args.providers.split(","):
            why = unavailable(provider, args.device)
            if why is not None:
                rows.append([provider, mode, "-", "-", "-", "-", "-", "-", "skipped: " + why])
                continue
            r = run_one(provider, mode, args)
            if "error" in r:
                rows.append([provider, mode, "-", "-", "-", "-", "-", "-", "error: " + r["error"]])
                continue
            results[(provider, mode)] = r
            floor_s = floor_bytes / (r["copy_gbps"] * 1e9)
            eager_r = results.get(("eager", mode))
            speedup = "%.2fx" % (eager_r["seconds"] / r["seconds"]) if eager_r else "-"
            rows.append([provider, mode, fmt_time(r["seconds"]), "%.1f" % (floor_bytes / r["seconds"] / 1e9),
                         "%.0f%%" % (100 * floor_s / r["seconds"]), "%.1f MiB" % (r["peak"] / 2**20),
                         "%.1f MiB" % (max(r["peak"] - grad_bytes, 0) / 2**20), speedup, ""])
    mem_how = ("torch.cuda.max_memory_allocated over the inputs" if not cpu else
               "peak RSS (VmHWM reset via /proc/self/clear_refs) over the RSS before the call, fresh process each")
    title = "token_logprobs + entropy, %s, %s, N=%d, V=%d (logits %.0f MiB; %d threads)" % (
        args.device, args.dtype, args.N, args.V, logits_bytes / 2**20, torch.get_num_threads())
    header = ["provider", "mode", "median", "GB/s", "% of floor", "peak extra", "beyond grad", "vs eager", "note"]
    print_table(title, header, rows)
    copy = [r["copy_gbps"] for r in results.values()]
    if copy:
        print("\ncopy bandwidth measured in the same runs: %.1f GB/s (median over providers)" % sorted(copy)[len(copy) // 2])
    print("peak extra memory: %s" % mem_how)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header + ["device", "dtype", "N", "V", "torch"])
            for row in rows:
                w.writerow(row + [args.device, args.dtype, args.N, args.V, torch.__version__])

    # the targets for this shape
    e, c = results.get(("eager", "fwd+bwd")), results.get(("cpu" if cpu else "cuda", "fwd+bwd"))
    if cpu and e and c and args.dtype == "float32":
        ratio = e["seconds"] / c["seconds"]
        e_extra, c_extra = max(e["peak"] - logits_bytes, 1), max(c["peak"] - logits_bytes, 0)
        print("\nCPU target (fp32, fwd+bwd): cpu is %.2fx faster than eager (target >= 3x): %s; "
              "peak extra beyond the gradient %.1f MiB vs eager %.1f MiB = %.3f of it (target <= 0.25): %s"
              % (ratio, "MET" if ratio >= 3 else "MISSED", c_extra / 2**20, e_extra / 2**20, c_extra / e_extra,
                 "MET" if c_extra <= 0.25 * e_extra else "MISSED"))
    if not cpu and c:
        fwd = results.get(("cuda", "fwd"))
        print("\nGPU target (H100, bf16, N=16384, V=152064): fwd %s (target <= 2.1 ms), fwd+bwd %s (target <= 6.2 ms)"
              % (fmt_time(fwd["seconds"]) if fwd else "-", fmt_time(c["seconds"])))
    if not cpu:  # the forward at the bandwidth floor (H200 times at its two shapes)
        h200_ms = {(8192, 151936): 0.71, (16384, 152064): 1.41}.get((args.N, args.V))
        for name in ("cuda", "triton"):
            for mode, goal in (("fwd", 85), ("fwd+bwd", 78)):
                r = results.get((name, mode))
                if not r:
                    continue
                pct = 100 * logits_bytes * (1 if mode == "fwd" else 3) / (r["copy_gbps"] * 1e9) / r["seconds"]
                print("GPU target (bf16, N=%d, V=%d, with entropy): %s %s %s = %.0f%% of the one-read floor (target "
                      ">= %d%%): %s%s" % (args.N, args.V, name, mode, fmt_time(r["seconds"]), pct, goal,
                                         "MET" if pct >= goal else "MISSED",
                                         "; on an H200 the fwd target is <= %.2f ms" % h200_ms
                                         if h200_ms and mode == "fwd" else ""))


if __name__ == "__main__":
    main()
