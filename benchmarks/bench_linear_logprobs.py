"""Benchmark of linear_token_logprobs (LM head matmul + log-probability of the label + entropy).

Providers (hidden [N, H], weight [V, H], labels [N]):
  unfused    logits = hidden @ weight.T, then rlhf_kernels.token_logprobs (auto backend): the
             [N, V] logits exist, but the softmax part is our fused kernel
  eager      torch: logits in the input dtype, then float32 log_softmax + gather + entropy
  chunked    the torch backend: tokens in chunks, logits recomputed in the backward (checkpoint)
  cce        cut-cross-entropy's linear_cross_entropy (logp = -loss per token; no entropy), GPU only
  liger      Liger-Kernel's fused linear cross-entropy (logp = -loss; no entropy), GPU only
  cpu / triton / cuda   rlhf_kernels.linear_token_logprobs(..., return_entropy=True, backend=...)
Modes: fwd (no autograd) and fwd+bwd (backward of logp.sum() + entropy.sum() to hidden and weight).

Every (provider, mode) runs in a fresh subprocess, so peak memory is that provider's own.
Peak extra memory: on CUDA torch.cuda.max_memory_allocated() over the inputs; on the CPU the
peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the resident size
before the measured call. "beyond grads" subtracts the d_hidden and d_weight that fwd+bwd must
produce. TFLOP/s counts the necessary matmul work: 2NHV forward, 6NHV forward+backward (the
forward and the two gradient matmuls; recomputing the logits in the backward is not counted).
A figure quoted as "effective TFLOP/s" elsewhere may count 8NHV (with the recompute).

    python benchmarks/bench_linear_logprobs.py                 # this machine: fp32 N=1024 H=512 V=32000
    python benchmarks/bench_linear_logprobs.py --device cuda   # bf16 N=16384 H=4096 V=131072 (H100 target)
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

PROVIDERS = ["unfused", "eager", "chunked", "cce", "liger", "cpu", "triton", "cuda"]
MODES = ["fwd", "fwd+bwd"]


# ---- the providers: fn(hidden, weight, labels) -> (logp, entropy) ----

def eager(h, w, y):
    logp_all = torch.log_softmax((h @ w.T).float(), dim=-1)
    logp = logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def make_provider(name):
    import rlhf_kernels as rk
    if name == "eager":
        return eager
    if name == "unfused":
        return lambda h, w, y: rk.token_logprobs(h @ w.T, y, return_entropy=True)
    if name == "chunked":
        from rlhf_kernels.reference.linear_logprobs import chunked_linear_token_logprobs
        return lambda h, w, y: chunked_linear_token_logprobs(h, w, y)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, y):
            logp = -linear_cross_entropy(h, w, y, reduction="none")
            return logp, torch.zeros_like(logp)
        return cce
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger(h, w, y):
            logp = -flce(w, h, y)
            return logp, torch.zeros_like(logp)
        return liger
    return lambda h, w, y: rk.linear_token_logprobs(h, w, y, return_entropy=True, backend=name)


def unavailable(name, device):
    """None if the provider can run here, else why not."""
    if name in ("cce", "liger"):
        module = "cut_cross_entropy" if name == "cce" else "liger_kernel"
        try:
            __import__(module)
        except ImportError:
            return "%s is not installed" % module
        if device != "cuda":
            return "needs a GPU"
    if name in ("cpu", "triton", "cuda"):
        from rlhf_kernels import _backend
        if name == "triton" and device == "cpu":
            return "Triton runs on a GPU (the CPU interpreter is for tests)"
        return _backend.why_not(name, device)
    return None


# ---- one measurement, in a fresh process ----

def measure(provider, mode, device, dtype, N, H, V, repeats):
    dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)  # inputs made on the device, never copied over
    h = torch.randn(N, H, generator=gen, device=device, dtype=dtype)
    w = torch.randn(V, H, generator=gen, device=device, dtype=dtype) * (3 / H ** 0.5)
    y = torch.randint(0, V, (N,), generator=gen, device=device)
    fn = make_provider(provider)
    if mode == "fwd+bwd":
        h.requires_grad_(True)
        w.requires_grad_(True)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(h, w, y)
        else:
            h.grad = w.grad = None
            logp, ent = fn(h, w, y)
            (logp.sum() + ent.sum()).backward()

    step()  # warm-up: compiles, autotunes, faults in pages
    h.grad = w.grad = None
    peak = peak_extra_bytes(step, device)
    seconds = median_time(step, device=device, warmup=1, repeats=repeats)
    return {"seconds": seconds, "peak": peak}


# ---- the driver ----

def run_one(provider, mode, args):
    if args.device == "cuda":  # CUDA's allocator statistics isolate each provider's peak: one process
        return measure_here(measure, provider, mode, args.device, args.dtype, args.N, args.H, args.V, args.repeats)
    return run_child(os.path.abspath(__file__), provider, mode, dict(device=args.device, dtype=args.dtype, N=args.N,
                                                                   H=args.H, V=args.V, repeats=args.repeats))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--N", type=int, default=None)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--V", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--child", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.N = args.N or (1024 if cpu else 16384)
    args.H = args.H or (512 if cpu else 4096)
    args.V = args.V or (32000 if cpu else 131072)

    if args.child:
        print(json.dumps(measure(*args.child, args.device, args.dtype, args.N, args.H, args.V, args.repeats)))
        return

    elt = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    N, H, V = args.N, args.H, args.V
    grad_bytes = (N * H + V * H) * elt  # d_hidden and d_weight
    results, rows = {}, []
    for mode in args.modes.split(","):
        flops = (2 if mode == "fwd" else 6) * N * H * V
        must = 0 if mode == "fwd" else grad_bytes
        for provider in args.providers.split(","):
            why = unavailable(provider, args.device)
            if why is not None:
                rows.append([provider, mode, "-", "-", "-", "-", "-", "skipped: " + why])
                continue
            r = run_one(provider, mode, args)
            if "error" in r:
                rows.append([provider, mode, "-", "-", "-", "-", "-", "error: " + r["error"]])
                continue
            results[(provider, mode)] = r
            base = results.get(("unfused", mode))
            ratio = "%.2fx" % (r["seconds"] / base["seconds"]) if base else "-"
            note = "no entropy" if provider in ("cce", "liger") else ""
            rows.append([provider, mode, fmt_time(r["seconds"]), "%.2f" % (flops / r["seconds"] / 1e12),
                         "%.1f MiB" % (r["peak"] / 2**20), "%.1f MiB" % (max(r["peak"] - must, 0) / 2**20),
                         ratio, note])
    title = "linear_token_logprobs + entropy, %s, %s, N=%d, H=%d, V=%d (logits would be %.0f MiB; %d threads)" % (
        args.device, args.dtype, N, H, V, N * V * elt / 2**20, torch.get_num_threads())
    header = ["provider", "mode", "median", "TFLOP/s", "peak extra", "beyond grads", "time vs unfused", "note"]
    print_table(title, header, rows)
    print("peak extra memory: %s" % ("torch.cuda.max_memory_allocated over the inputs" if not cpu else
                                     "peak RSS over the RSS before the call, a fresh process per row"))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header + ["device", "dtype", "N", "H", "V", "torch"])
            for row in rows:
                w.writerow(row + [args.device, args.dtype, N, H, V, torch.__version__])

    # the targets
    if cpu:
        for mode in args.modes.split(","):
            u, c = results.get(("unfused", mode)), results.get(("cpu", mode))
            if not (u and c):
                continue
            must = 0 if mode == "fwd" else grad_bytes
            u_extra, c_extra = max(u["peak"] - must, 1), max(c["peak"] - must, 0)
            t = c["seconds"] / u["seconds"]
            print("CPU target (%s, %s): cpu peak extra %s %.1f MiB vs unfused %.1f MiB = %.3f of it (target <= 0.10): "
                  "%s; time %.2fx unfused (target <= 1.3x): %s"
                  % (args.dtype, mode, "beyond grads" if must else "", c_extra / 2**20, u_extra / 2**20,
                     c_extra / u_extra, "MET" if c_extra <= 0.10 * u_extra else "MISSED", t,
                     "MET" if t <= 1.3 else "MISSED"))
    else:
        c, ch = results.get(("cuda", "fwd+bwd")), results.get(("chunked", "fwd+bwd"))
        if c:
            print("GPU target (H100, bf16, N=16384, H=4096, V=131072, fwd+bwd with entropy): cuda %s (target <= 115 ms, "
                  "stretch <= 105 ms)%s; peak extra beyond grads %.0f MiB (target <= 1024 MiB)"
                  % (fmt_time(c["seconds"]),
                     "; %.2fx faster than chunked (target >= 2x)" % (ch["seconds"] / c["seconds"]) if ch else "",
                     max(c["peak"] - grad_bytes, 0) / 2**20))


if __name__ == "__main__":
    main()
