"""Benchmark of linear_policy_loss: the policy head, hidden states straight to the PPO objective
(LM head matmul + log-probability of the label + entropy + PPO clipped loss + k3 KL penalty).

Providers (hidden [B, T, H], weight [V, H], labels, old/ref log-probabilities, advantages, mask [B, T];
entropy_coef 0.01, kl_coef 0.05, token-mean):
  eager      the unfused eager path: logits = hidden @ weight.T, float32 log_softmax, gather, entropy,
             the PPO loss and KL in torch, autograd backward (the CPU target's baseline)
  unfused    logits = hidden @ weight.T, then our kernels: token_logprobs (with entropy), ppo_policy_loss,
             kl_penalty
  lin+ppo    our linear_token_logprobs (the [N, V] logits never exist; its backward recomputes them),
             then ppo_policy_loss and kl_penalty
  chunked    linear_policy_loss's torch backend: tokens in chunks, logits recomputed in the backward
  liger      Liger-Kernel's LigerFusedLinearGRPOLoss (token-level clipping, k3 KL; per-sequence
             advantages; no entropy term), GPU only
  cce        cut-cross-entropy's linear_cross_entropy for logp (no entropy), then ppo_policy_loss, GPU only
  cpu / triton / cuda   rk.linear_policy_loss(..., backend=...): gradients made in the forward
  lin_logprobs  linear_token_logprobs alone (auto backend, with entropy; backward of logp.sum() +
             entropy.sum()): the targets for that op
  matmul     the bare LM head matmul hidden @ weight.T (fwd only): the floor of a no-grad forward
Modes: fwd (no autograd) and fwd+bwd (backward of the loss to hidden and weight).

TFLOP/s is given twice: on the step's necessary matmul work (2NHV forward, 6NHV forward+backward)
and on what the provider really multiplies ("done": 8NHV for those whose backward recomputes the
logits; 6NHV for Liger's forward, which always makes the gradients).
Peak extra memory: on the CPU the peak resident set size over the resident size before the call, each
(provider, mode) in a fresh subprocess (benchmarks/common.py); on CUDA torch.cuda.max_memory_allocated()
over the inputs, one process, inputs made on the device with a seeded device generator. "beyond grads"
subtracts the d_hidden and d_weight that fwd+bwd must produce.

    python benchmarks/bench_policy_head.py                 # this machine: fp32 N=1024 H=512 V=32000
    python benchmarks/bench_policy_head.py --device cuda   # bf16 N=16384 H=4096 V=131072 (H200 target)
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

PROVIDERS = ["eager", "unfused", "lin+ppo", "chunked", "liger", "cce", "cpu", "triton", "cuda", "lin_logprobs",
             "matmul"]
MODES = ["fwd", "fwd+bwd"]
ENTROPY_COEF, KL_COEF, CLIP = 0.01, 0.05, 0.2
RECOMPUTE = {"lin+ppo", "chunked", "cce", "lin_logprobs"}  # backward recomputes the logits: 8NHV


# ---- the providers: fn(h, w, y, old, adv, mask, ref) -> loss ----

def _token_mean(x, mask):
    return torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)


def eager(h, w, y, old, adv, mask, ref):
    logp_all = torch.log_softmax((h @ w.T).float(), dim=-1)
    logp = logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    log_r = logp - ref
    kl = torch.exp(-log_r) - 1 + log_r
    return _token_mean(pg + KL_COEF * kl - ENTROPY_COEF * entropy, mask)


def _losses_from_logp(rk, logp, entropy, old, adv, mask, ref):
    loss, _ = rk.ppo_policy_loss(logp, old, adv, mask, clip_low=CLIP)
    kl = rk.kl_penalty(logp, ref, "k3")
    return loss + _token_mean(KL_COEF * kl - ENTROPY_COEF * entropy, mask)


def make_provider(name):
    import rlhf_kernels as rk
    if name == "eager":
        return eager
    if name == "unfused":
        def unfused(h, w, y, old, adv, mask, ref):
            logp, entropy = rk.token_logprobs(h @ w.T, y, return_entropy=True)
            return _losses_from_logp(rk, logp, entropy, old, adv, mask, ref)
        return unfused
    if name == "matmul":
        return lambda h, w, *_: h @ w.T
    if name == "lin_logprobs":
        def lin_logprobs(h, w, y, *_):
            logp, entropy = rk.linear_token_logprobs(h, w, y, return_entropy=True)
            return logp.sum() + entropy.sum()
        return lin_logprobs
    if name == "lin+ppo":
        def lin_ppo(h, w, y, old, adv, mask, ref):
            logp, entropy = rk.linear_token_logprobs(h, w, y, return_entropy=True)
            return _losses_from_logp(rk, logp, entropy, old, adv, mask, ref)
        return lin_ppo
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, y, old, adv, mask, ref):
            logp = -linear_cross_entropy(h, w, y, reduction="none").float()
            return _losses_from_logp(rk, logp, torch.zeros_like(logp), old, adv, mask, ref)
        return cce
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        grpo = LigerFusedLinearGRPOLoss(beta=KL_COEF, use_ref_model=True, epsilon_low=CLIP, epsilon_high=CLIP,
                                        loss_type="bnpo")

        def liger(h, w, y, old, adv, mask, ref):
            out = grpo(h, w, y, mask.long(), adv[:, 0], ref_per_token_logps=ref, old_per_token_logps=old)
            return out[0] if isinstance(out, tuple) else out
        return liger
    backend = "torch" if name == "chunked" else name

    def ours(h, w, y, old, adv, mask, ref):
        return rk.linear_policy_loss(h, w, y, old, adv, mask, ref_logprobs=ref, kl_coef=KL_COEF, kl_kind="k3",
                                     entropy_coef=ENTROPY_COEF, clip_low=CLIP, backend=backend)[0]
    return ours


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


# ---- one measurement ----

def make_inputs(device, dtype, B, T, H, V):
    """Inputs made on the device (seeded device generator); old and ref log-probabilities near the
    policy's own (ratios around 1, some clipped)."""
    import rlhf_kernels as rk
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(B, T, H, generator=gen, device=device, dtype=dtype)
    w = torch.randn(V, H, generator=gen, device=device, dtype=dtype) * (3 / H ** 0.5)
    y = torch.randint(0, V, (B, T), generator=gen, device=device)
    mask = torch.rand(B, T, generator=gen, device=device) < 0.9
    adv = torch.randn(B, T, generator=gen, device=device)
    with torch.no_grad():
        zeros = torch.zeros(B, T, device=device)
        logp = rk.linear_policy_loss(h, w, y, zeros, zeros, torch.ones_like(mask))[1]["logprobs"]
    old = logp + 0.1 * torch.randn(B, T, generator=gen, device=device)
    ref = logp + 0.1 * torch.randn(B, T, generator=gen, device=device)
    return h, w, y, old, adv, mask, ref


def measure(provider, mode, device, dtype, B, T, H, V, repeats):
    h, w, y, old, adv, mask, ref = make_inputs(device, getattr(torch, dtype), B, T, H, V)
    fn = make_provider(provider)
    if mode == "fwd+bwd":
        h.requires_grad_(True)
        w.requires_grad_(True)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(h, w, y, old, adv, mask, ref)
        else:
            h.grad = w.grad = None
            fn(h, w, y, old, adv, mask, ref).backward()

    if provider == "matmul" and mode != "fwd":
        return {"error": "fwd only"}
    step()  # warm-up: compiles, autotunes, faults in pages
    h.grad = w.grad = None
    peak = peak_extra_bytes(step, device)
    seconds = median_time(step, device=device, warmup=1, repeats=repeats)
    return {"seconds": seconds, "peak": peak}


# ---- the driver ----

def run_one(provider, mode, args):
    shape = dict(device=args.device, dtype=args.dtype, B=args.B, T=args.T, H=args.H, V=args.V, repeats=args.repeats)
    if args.device == "cuda":  # CUDA's allocator statistics isolate each provider's peak: one process
        return measure_here(measure, provider, mode, *shape.values())
    return run_child(os.path.abspath(__file__), provider, mode, shape)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--T", type=int, default=None)
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
    args.B = args.B or (8 if cpu else 16)
    args.T = args.T or (128 if cpu else 1024)
    args.H = args.H or (512 if cpu else 4096)
    args.V = args.V or (32000 if cpu else 131072)

    if args.child:
        r = measure(*args.child, args.device, args.dtype, args.B, args.T, args.H, args.V, args.repeats)
        print(json.dumps(r))
        return

    elt = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    N, H, V = args.B * args.T, args.H, args.V
    grad_bytes = (N * H + V * H) * elt  # d_hidden and d_weight
    results, rows = {}, []
    for mode in args.modes.split(","):
        need = (2 if mode == "fwd" else 6) * N * H * V
        must = 0 if mode == "fwd" else grad_bytes
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
            done = need
            if mode == "fwd+bwd" and provider in RECOMPUTE:
                done = 8 * N * H * V
            if provider == "liger":
                done = 6 * N * H * V
            base = results.get(("eager", mode))
            ratio = "%.2fx" % (r["seconds"] / base["seconds"]) if base else "-"
            note = "no entropy" if provider in ("cce", "liger") else ""
            rows.append([provider, mode, fmt_time(r["seconds"]), "%.2f" % (need / r["seconds"] / 1e12),
                         "%.2f (%dNHV)" % (done / r["seconds"] / 1e12, done // (N * H * V)),
                         "%.1f MiB" % (r["peak"] / 2**20), "%.1f MiB" % (max(r["peak"] - must, 0) / 2**20),
                         ratio, note])
    title = ("linear_policy_loss (PPO + entropy + k3 KL), %s, %s, B=%d, T=%d (N=%d), H=%d, V=%d "
             "(logits would be %.0f MiB; %d threads)" % (args.device, args.dtype, args.B, args.T, N, H, V,
                                                        N * V * 4 / 2**20, torch.get_num_threads()))
    header = ["provider", "mode", "median", "TFLOP/s (6NHV)", "TFLOP/s (done)", "peak extra", "beyond grads",
              "time vs eager", "note"]
    print_table(title, header, rows)
    print("peak extra memory: %s" % ("torch.cuda.max_memory_allocated over the inputs" if not cpu else
                                     "peak RSS over the RSS before the call, a fresh process per row"))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header + ["device", "dtype", "B", "T", "H", "V", "torch"])
            for row in rows:
                w.writerow(row + [args.device, args.dtype, args.B, args.T, H, V, torch.__version__])

    # the targets
    if cpu:
        e, c = results.get(("eager", "fwd+bwd")), results.get(("cpu", "fwd+bwd"))
        if e and c:
            e_extra, c_extra = max(e["peak"] - grad_bytes, 1), max(c["peak"] - grad_bytes, 0)
            t = c["seconds"] / e["seconds"]
            print("CPU target (%s, fwd+bwd): time %.2fx the unfused eager path (target <= 0.9x): %s; peak extra "
                  "beyond grads %.1f MiB vs eager %.1f MiB = %.3f of it (target <= 0.10): %s"
                  % (args.dtype, t, "MET" if t <= 0.9 else "MISSED", c_extra / 2**20, e_extra / 2**20,
                     c_extra / e_extra, "MET" if c_extra <= 0.10 * e_extra else "MISSED"))
    else:
        gpu = torch.cuda.get_device_name(0)
        h100 = "H100" in gpu
        print("GPU targets (bf16, N=16384, H=4096, V=131072, with entropy; %s):" % gpu)
        for name in ("cuda", "triton"):
            c = results.get((name, "fwd+bwd"))
            if not c:
                continue
            limit = 0.088 if h100 else 0.080
            extra = max(c["peak"] - grad_bytes, 0)
            others = ["%s %.2fx" % (o, results[(o, "fwd+bwd")]["seconds"] / c["seconds"])
                      for o in ("unfused", "liger") if (o, "fwd+bwd") in results]
            print("  linear_policy_loss %s fwd+bwd %s (target <= %.0f ms on an %s): %s; peak extra beyond grads "
                  "%.0f MiB (target <= 1024 MiB): %s; faster than %s (target: faster than unfused and liger)"
                  % (name, fmt_time(c["seconds"]), limit * 1e3, "H100" if h100 else "H200",
                     "MET" if c["seconds"] <= limit else "MISSED", extra / 2**20, "MET" if extra <= 1 << 30 else
                     "MISSED", ", ".join(others) or "-"))
        lb, lf, mm = (results.get(k) for k in (("lin_logprobs", "fwd+bwd"), ("lin_logprobs", "fwd"),
                                              ("matmul", "fwd")))
        if lb:
            print("  linear_token_logprobs fwd+bwd %s (target <= 100 ms): %s; %.0f TFLOP/s on 8NHV (target >= 700)"
                  % (fmt_time(lb["seconds"]), "MET" if lb["seconds"] <= 0.100 else "MISSED",
                     8 * N * H * V / lb["seconds"] / 1e12))
        if lf:
            print("  linear_token_logprobs no-grad fwd %s (target <= 26 ms)%s: %s"
                  % (fmt_time(lf["seconds"]), "; the bare matmul %s" % fmt_time(mm["seconds"]) if mm else "",
                     "MET" if lf["seconds"] <= 0.026 else "MISSED"))
        print("  (token_logprobs' forward against its floor: benchmarks/bench_logprobs.py --device cuda --N 8192 "
              "--V 151936)")


if __name__ == "__main__":
    main()
