"""Benchmark of the losses (the ppo, bt and score families): forward + backward, median time per call.

    python benchmarks/bench_losses.py [--device cpu|cuda] [--repeats N] [--threads N]

Providers: the eager PyTorch reference (rlhf_kernels/reference, run on the float32
inputs as a trainer would), torch.compile of that reference, and the rlhf_kernels
backends usable on the device (cpu; triton and cuda on a GPU). Workloads:
  ppo   policy + value loss, forward + backward, B x T = 64 x 4096 fp32, right-padded rows
  ppo options  the same with the policy loss's options: GSPO's sequence ratio with a geometric
        truncated correction (rollout log-probabilities), and CISPO with a token-level mask
  bt    Bradley-Terry loss with margin and smoothing, P = 4096 pairs, forward + backward
  rank  all-pairs ranking loss, P = 512 prompts x K = 8 (ragged), forward + backward
  score ordinal (cumulative-link) score loss, P = 4096 responses, K = 7 levels, forward + backward
        (gradients to the rewards and the thresholds)
Prints markdown tables and the CPU target (cpu >= 3x eager on the ppo workload).
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmark this checkout's rlhf_kernels, not another install
from common import fmt_time, median_time, print_table, write_csv  # noqa: E402

import rlhf_kernels as rk  # noqa: E402
from rlhf_kernels import _backend  # noqa: E402
from rlhf_kernels.reference import bt as ref_bt  # noqa: E402
from rlhf_kernels.reference import ppo as ref_ppo  # noqa: E402
from rlhf_kernels.reference import score as ref_score  # noqa: E402


def ppo_inputs(B, T, device, gen):
    logp = -3 * torch.rand(B, T, generator=gen)
    old = logp + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    old_values = values + 0.3 * torch.randn(B, T, generator=gen)
    returns = values + torch.randn(B, T, generator=gen)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return [t.to(device) for t in (logp, old, adv, values, old_values, returns, mask)]


# the policy loss's options benchmarked (ppo_step_fn's `options`): name -> keyword arguments
# (rollout_logprobs added by ppo_step_fn)
PPO_OPTIONS = {
    "gspo+tis-geometric": dict(clip_low=3e-4, clip_high=4e-4, ratio_level="sequence", is_correction="tis",
                               is_level="geometric"),
    "cispo+mis-token": dict(clip_low=0.2, clip_high=0.28, objective="cispo", is_correction="mis", is_cap=2.0),
}


def rollout_logprobs(old):
    """The rollout engine's log-probabilities: the old ones off by a little (own generator, so
    that the other workloads' inputs stay as they were)."""
    g = torch.Generator().manual_seed(1)
    return (old.cpu() + 0.05 * torch.randn(old.shape, generator=g)).to(old.device)


def ppo_step_fn(provider, inputs, options=None):
    logp, old, adv, values, old_values, returns, mask = inputs
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    if options is not None:
        kw = dict(PPO_OPTIONS[options], rollout_logprobs=rollout_logprobs(old))

    def reference(lp, v):
        pl, ps = ref_ppo.ppo_policy_loss(lp, old, adv, mask, num_tokens=None, **kw)
        vl, vs = ref_ppo.ppo_value_loss(v, old_values, returns, mask, clip=0.2)
        return pl + 0.5 * vl, ps, vs

    def kernels(lp, v):
        pl, ps = rk.ppo_policy_loss(lp, old, adv, mask, backend=provider, **kw)
        vl, vs = rk.ppo_value_loss(v, old_values, returns, mask, clip=0.2, backend=provider)
        return pl + 0.5 * vl, ps, vs

    fwd = {"eager": reference, "compile": torch.compile(reference)}.get(provider, kernels)
    lp, v = logp.clone().requires_grad_(), values.clone().requires_grad_()

    def step():
        loss, ps, vs = fwd(lp, v)
        return torch.autograd.grad(loss, (lp, v))

    return step


def bt_step_fn(provider, device, gen):
    P = 4096
    chosen, rejected = torch.randn(P, generator=gen).to(device), torch.randn(P, generator=gen).to(device)
    margin = torch.rand(P, generator=gen).to(device)

    def reference(c, r):
        return ref_bt.bt_loss(c, r, margin, 0.1, 0.01)

    def kernels(c, r):
        return rk.bt_loss(c, r, margin=margin, label_smoothing=0.1, center_coef=0.01, backend=provider)

    fwd = {"eager": reference, "compile": torch.compile(reference)}.get(provider, kernels)
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()

    def step():
        loss, _ = fwd(c, r)
        return torch.autograd.grad(loss, (c, r))

    return step, "P=%d" % P


def ranking_step_fn(provider, device, gen):
    P, K = 512, 8
    rewards = torch.randn(P, K, generator=gen).to(device)
    lengths = torch.randint(1, K + 1, (P,), generator=gen)
    valid = (torch.arange(K)[None, :] < lengths[:, None]).to(device)

    def reference(x):
        return ref_bt.ranking_loss(x, valid)

    def kernels(x):
        return rk.ranking_loss(x, valid=valid, backend=provider)

    fwd = {"eager": reference, "compile": torch.compile(reference)}.get(provider, kernels)
    x = rewards.clone().requires_grad_()

    def step():
        loss, _ = fwd(x)
        return torch.autograd.grad(loss, (x,))

    return step, "P=%d K=%d" % (P, K)


def score_step_fn(provider, device, gen):
    P, K = 4096, 7
    pred = (2 * torch.randn(P, generator=gen)).to(device)
    level = torch.randint(0, K, (P,), generator=gen).to(device)
    thresholds = torch.linspace(-3, 3, K - 1).to(device)

    def reference(x, t):
        return ref_score.ordinal_loss(x, level, t)

    def kernels(x, t):  # validate=False: on a GPU the level check is a host sync by design
        return rk.score_loss(x, level, kind="ordinal", thresholds=t, validate=False, backend=provider)

    fwd = {"eager": reference, "compile": torch.compile(reference)}.get(provider, kernels)
    x, t = pred.clone().requires_grad_(), thresholds.clone().requires_grad_()

    def step():
        loss, _ = fwd(x, t)
        return torch.autograd.grad(loss, (x, t))

    return step, "P=%d K=%d" % (P, K)


def providers(device):
    names = ["eager", "compile"]
    names += [b for b in ("cpu", "triton", "cuda") if b in _backend.available(device)]
    if device == "cpu":
        names = [n for n in names if n != "triton"]  # the interpreter is not a timing target
    return names


def run(device, repeats, records):
    gen = torch.Generator().manual_seed(0)
    B, T = 64, 4096
    inputs = ppo_inputs(B, T, device, gen)
    results = {}
    rows = []
    for name in providers(device):
        t = median_time(ppo_step_fn(name, inputs), device=device, warmup=3, repeats=repeats, min_time=0.2)
        results[name] = t
    for name, t in results.items():
        rows.append([name, "%dx%d" % (B, T), "fp32", fmt_time(t), "%.2fx" % (results["eager"] / t)])
        records.append({"family": "ppo", "op": "ppo_policy+value fwd+bwd", "provider": name, "shape": "%dx%d" % (B, T),
                        "dtype": "float32", "median_s": t, "speedup_vs_eager": results["eager"] / t,
                        "speedup_vs_compile": results["compile"] / t, "threads": torch.get_num_threads()})
    print_table("ppo: policy + value loss, forward + backward (%s, %d threads)"
                % (device, torch.get_num_threads()), ["provider", "B x T", "dtype", "median", "vs eager"], rows)

    rows = []
    for options in PPO_OPTIONS:
        times = {name: median_time(ppo_step_fn(name, inputs, options), device=device, warmup=3, repeats=repeats,
                                   min_time=0.2) for name in providers(device)}
        for name, t in times.items():
            rows.append([options, name, fmt_time(t), "%.2fx" % (times["eager"] / t),
                         "%.2fx" % (t / results[name])])
            records.append({"family": "ppo", "op": "ppo_policy+value fwd+bwd, %s" % options, "provider": name,
                            "shape": "%dx%d" % (B, T), "dtype": "float32", "median_s": t,
                            "speedup_vs_eager": times["eager"] / t, "speedup_vs_compile": times["compile"] / t,
                            "threads": torch.get_num_threads()})
    print_table("ppo options: policy (with options) + value loss, forward + backward, %dx%d fp32 (%s)"
                % (B, T, device), ["options", "provider", "median", "vs eager", "vs plain ppo"], rows)

    for family, title, make in (("bt", "bt: Bradley-Terry loss, forward + backward", bt_step_fn),
                                ("bt", "ranking: all-pairs loss, forward + backward", ranking_step_fn),
                                ("score", "score: ordinal score loss, forward + backward", score_step_fn)):
        times, shape = {}, ""
        for name in providers(device):
            step, shape = make(name, device, gen)
            times[name] = median_time(step, device=device, warmup=3, repeats=repeats, min_time=0.2)
        print_table("%s (%s)" % (title, device), ["provider", "shape", "median", "vs eager"],
                    [[n, shape, fmt_time(t), "%.2fx" % (times["eager"] / t)] for n, t in times.items()])
        records.extend([{"family": family, "op": title.split(":")[0] + " fwd+bwd", "provider": n, "shape": shape,
                     "dtype": "float32", "median_s": t, "speedup_vs_eager": times["eager"] / t,
                     "speedup_vs_compile": times["compile"] / t, "threads": torch.get_num_threads()}
                    for n, t in times.items()])

    if device == "cpu" and "cpu" in results:
        ratio = results["eager"] / results["cpu"]
        print("\nCPU target: cpu backend %.2fx faster than eager on ppo policy+value fwd+bwd %dx%d fp32 "
              "(target >= 3x): %s" % (ratio, B, T, "met" if ratio >= 3 else "MISSED"))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    run(args.device, args.repeats, records)
    if args.csv:
        write_csv(args.csv, records)


if __name__ == "__main__":
    main()
