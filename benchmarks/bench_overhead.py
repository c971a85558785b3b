"""Host cost per call of every public op, next to two floors measured in the same run.

    python benchmarks/bench_overhead.py [--device cpu|cuda] [--csv PATH] [--rounds N]

CPU (always): tiny tensors (a 4 x 8 batch; V = 16; H = 16), one thread, so that the time is
the host's: Python, the dispatcher, allocation, autograd. Each op is timed forward alone and,
where it has a gradient, forward + backward (``torch.autograd.grad``). Floors:
  add       one ``torch.add`` of two such tensors: the cheapest op call there is;
  autograd  ``torch.autograd.grad`` through two built-in elementwise ops and a sum: what any
            differentiable step costs before it computes anything.
Forward times are reported as multiples of ``add``, forward + backward ones as multiples of
``autograd``. Rounds interleave every case with the floors (median of rounds), so a busy
machine slows floors and ops alike.

GPU (``--device cuda``): the same CPU table, then the steps the GPU targets name, with inputs
made on the GPU: the PPO policy + value forward + backward at 64 x 4096 fp32 (cuda, triton,
torch.compile of the reference), bt_loss forward + backward at P = 4096, score_loss (ordinal,
K = 7) forward + backward at P = 4096, and gae at 64 x 4096, 128 x 4096 and 16 x 32768. For
each: wall time per call back to back (a loop of calls, one synchronize), GPU kernel time per
call and kernels per call (torch.profiler), and host syncs per call
(``torch.cuda.set_sync_debug_mode("warn")``).

Targets are printed beside the figures (met / missed); nothing is asserted: timings are
benchmarks, never tests.
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmark this checkout's rlhf_kernels, not another install
from common import fmt_time, print_table, write_csv  # noqa: E402

import rlhf_kernels as rk  # noqa: E402
from rlhf_kernels.reference import bt as ref_bt  # noqa: E402
from rlhf_kernels.reference import ppo as ref_ppo  # noqa: E402
from rlhf_kernels.reference import score as ref_score  # noqa: E402

# (case, floor, at most this many times the floor), from the issue that set them
CPU_TARGETS = {
    ("gae", "fwd"): 4.0,
    ("token_logprobs", "fwd"): 6.0,
    ("ppo_policy_loss", "fwd"): 6.0,
    ("token_logprobs", "fwd+bwd"): 1.3,
    ("bt_loss", "fwd+bwd"): 1.3,
    ("ppo policy+value", "fwd+bwd"): 1.6,
}


# ---------------------------------------------------------------- CPU: host cost per call

def cpu_cases(gen):
    """(name, mode, fn) for every public op on tiny CPU tensors (auto backend)."""
    B, T, V, H = 4, 8, 16, 16

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    mask = torch.rand(B, T, generator=gen) < 0.8
    r, v = randn(B, T), randn(B, T)
    cu = torch.tensor([0, 5, 13, B * T])
    logits, labels = randn(B, T, V), torch.randint(0, V, (B, T), generator=gen)
    ref_logits = randn(B, T, V)
    hidden, weight, lin_labels = randn(B * T, H), randn(V, H), torch.randint(0, V, (B * T,), generator=gen)
    lp, olp, adv = randn(B, T), randn(B, T), randn(B, T)
    old_v, ret = randn(B, T), randn(B, T)
    chosen, rejected = randn(2 * T), randn(2 * T)
    rank = randn(B, T)
    levels, thresholds = torch.randint(0, 5, (2 * T,), generator=gen), torch.tensor([-1.5, -0.5, 0.5, 1.5])
    seq_rewards, group_ids = randn(4 * B), torch.randint(0, 5, (4 * B,), generator=gen)

    def grad_of(fn, *xs):
        """fwd+bwd: the op, then torch.autograd.grad of its (summed) output."""
        leaves = [x.detach().requires_grad_() for x in xs]

        def step():
            out = fn(*leaves)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out if out.dim() == 0 else out.sum(), leaves)
        return step

    def ppo_pair(a, b):
        pl, _ = rk.ppo_policy_loss(a, olp, adv, mask)
        vl, _ = rk.ppo_value_loss(b, old_v, ret, mask)
        return pl + vl

    return [
        ("gae", "fwd", lambda: rk.gae(r, v, mask, gamma=0.99, lam=0.95)),
        ("gae_packed", "fwd", lambda: rk.gae_packed(r.reshape(-1), v.reshape(-1), cu, gamma=0.99, lam=0.95)),
        ("masked_whiten", "fwd", lambda: rk.masked_whiten(r, mask)),
        ("token_logprobs", "fwd", lambda: rk.token_logprobs(logits, labels)),
        ("token_logprobs", "fwd+bwd", grad_of(lambda z: rk.token_logprobs(z, labels), logits)),
        ("token_logprobs+entropy", "fwd+bwd",
         grad_of(lambda z: sum(rk.token_logprobs(z, labels, return_entropy=True)), logits)),
        ("token_entropy", "fwd", lambda: rk.token_entropy(logits)),
        ("token_entropy", "fwd+bwd", grad_of(rk.token_entropy, logits)),
        ("full_kl", "fwd", lambda: rk.full_kl(logits, ref_logits)),
        ("full_kl", "fwd+bwd", grad_of(lambda z: rk.full_kl(z, ref_logits), logits)),
        ("kl_penalty", "fwd", lambda: rk.kl_penalty(lp, olp, "k3")),
        ("kl_penalty", "fwd+bwd", grad_of(lambda a: rk.kl_penalty(a, olp, "k3"), lp)),
        ("linear_token_logprobs", "fwd", lambda: rk.linear_token_logprobs(hidden, weight, lin_labels)),
        ("linear_token_logprobs", "fwd+bwd",
         grad_of(lambda h, w: rk.linear_token_logprobs(h, w, lin_labels), hidden, weight)),
        ("linear_policy_loss", "fwd", lambda: rk.linear_policy_loss(hidden.view(B, T, H), weight, labels, olp, adv,
                                                                     mask)),
        ("linear_policy_loss", "fwd+bwd",
         grad_of(lambda h, w: rk.linear_policy_loss(h.view(B, T, H), w, labels, olp, adv, mask), hidden, weight)),
        ("ppo_policy_loss", "fwd", lambda: rk.ppo_policy_loss(lp, olp, adv, mask)),
        ("ppo_policy_loss", "fwd+bwd", grad_of(lambda a: rk.ppo_policy_loss(a, olp, adv, mask), lp)),
        ("ppo_value_loss", "fwd", lambda: rk.ppo_value_loss(v, old_v, ret, mask)),
        ("ppo_value_loss", "fwd+bwd", grad_of(lambda a: rk.ppo_value_loss(a, old_v, ret, mask), v)),
        ("ppo policy+value", "fwd+bwd", grad_of(ppo_pair, lp, v)),
        ("bt_loss", "fwd", lambda: rk.bt_loss(chosen, rejected)),
        ("bt_loss", "fwd+bwd", grad_of(rk.bt_loss, chosen, rejected)),
        ("ranking_loss", "fwd", lambda: rk.ranking_loss(rank)),
        ("ranking_loss", "fwd+bwd", grad_of(rk.ranking_loss, rank)),
        ("score_loss", "fwd", lambda: rk.score_loss(chosen, rejected)),
        ("score_loss", "fwd+bwd", grad_of(lambda x: rk.score_loss(x, rejected), chosen)),
        ("score_loss ordinal", "fwd", lambda: rk.score_loss(chosen, levels, kind="ordinal", thresholds=thresholds)),
        ("score_loss ordinal", "fwd+bwd",
         grad_of(lambda x, t: rk.score_loss(x, levels, kind="ordinal", thresholds=t), chosen, thresholds)),
        ("group_advantages", "fwd", lambda: rk.group_advantages(seq_rewards, group_size=4)),
        ("group_advantages ragged", "fwd", lambda: rk.group_advantages(seq_rewards, group_ids, mode="rloo")),
    ]


def per_call(fn, calls):
    """Seconds per call of ``fn`` over a loop of ``calls`` calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def cpu_table(rounds, calls):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    x = torch.randn(4, 8, generator=gen, requires_grad=True)

    def floor_autograd():
        torch.autograd.grad((x * 2).exp().sum(), [x])

    floors = {"add": lambda: torch.add(a, b), "autograd": floor_autograd}
    cases = cpu_cases(gen)
    for fn in list(floors.values()) + [c[2] for c in cases]:  # warm up every path once
        per_call(fn, 50)
    samples = {k: [] for k in list(floors) + [(c[0], c[1]) for c in cases]}
    for _ in range(rounds):
        for name, fn in floors.items():
            samples[name].append(per_call(fn, calls))
        for name, mode, fn in cases:
            # forward + backward calls cost ~10x more: fewer of them per round
            samples[(name, mode)].append(per_call(fn, calls // (10 if mode == "fwd+bwd" else 1)))
            samples["add"].append(per_call(floors["add"], calls // 4))
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows, records = [], []
    for name, mode, _ in cases:
        floor = "add" if mode == "fwd" else "autograd"
        ratio = med[(name, mode)] / med[floor]
        target = CPU_TARGETS.get((name, mode))
        verdict = "" if target is None else ("met" if ratio <= target else "MISSED")
        rows.append([name, mode, fmt_time(med[(name, mode)]), "%.2fx %s" % (ratio, floor),
                     "" if target is None else "<= %gx" % target, verdict])
        records.append(_record(provider="auto", op=name, mode=mode, device="cpu", median_s=med[(name, mode)],
                               floor=floor, floor_s=med[floor], ratio=ratio, target=target or "", verdict=verdict))
    title = ("host cost per call on the CPU, tiny tensors, 1 thread (auto backend = %s); floors: add %s, "
             "autograd %s (%.1fx add)" % (_auto("cpu"), fmt_time(med["add"]), fmt_time(med["autograd"]),
                                          med["autograd"] / med["add"]))
    print_table(title, ["op", "mode", "median per call", "x floor", "target", ""], rows)
    return records


CSV_FIELDS = ("provider", "op", "mode", "device", "median_s", "floor", "floor_s", "ratio", "target", "gpu_s",
              "kernels", "syncs", "verdict")


def _record(**kw):
    return {k: kw.get(k, "") for k in CSV_FIELDS}


def _auto(device):
    from rlhf_kernels import _backend
    return _backend.resolve("auto", device)


# ---------------------------------------------------------------- GPU: the steps the targets name

GPU_TARGETS = {  # (case, provider) -> {metric: bound}
    ("ppo 64x4096 fp32 fwd+bwd", "cuda"): {"wall_us": 150.0, "gpu_us": 15.0, "kernels": 4},
    ("bt P=4096 fwd+bwd", "cuda"): {"wall_us": 60.0},
    ("gae 64x4096", "cuda"): {"wall_us": 15.0},
    ("gae 128x4096", "cuda"): {"gpu_us": 5.0},
    ("gae 16x32768", "cuda"): {"gpu_us": 10.0},
}


def gpu_measure(fn, calls=200):
    """(wall seconds per call back to back, GPU kernel seconds per call, kernels per call,
    host syncs per call) for ``fn`` on the current CUDA device."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / calls)
    n_prof = 20
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n_prof):
            fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in device_events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    gpu_s = sum(e.time_range.elapsed_us() for e in device_events) / 1e6 / n_prof
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return statistics.median(walls), gpu_s, len(kernels) / n_prof, syncs


def gpu_cases(device):
    """(case, provider, fn) with inputs made on the GPU from a seeded device generator."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    B, T = 64, 4096
    logp = -3 * torch.rand(B, T, generator=gen, device=device)
    old, adv = logp + 0.3 * randn(B, T), randn(B, T)
    values = randn(B, T)
    old_v, ret = values + 0.3 * randn(B, T), values + randn(B, T)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    lp, v = logp.clone().requires_grad_(), values.clone().requires_grad_()

    def ppo_kernels(backend):
        def step():
            pl, _ = rk.ppo_policy_loss(lp, old, adv, mask, backend=backend)
            vl, _ = rk.ppo_value_loss(v, old_v, ret, mask, backend=backend)
            torch.autograd.backward((pl, vl), grad_tensors=(ones, ones))
        return step

    ones = torch.ones((), device=device)

    def ppo_reference(lp_, v_):
        pl, _ = ref_ppo.ppo_policy_loss(lp_, old, adv, mask)
        vl, _ = ref_ppo.ppo_value_loss(v_, old_v, ret, mask, clip=0.2)
        return pl + vl

    compiled = torch.compile(ppo_reference)

    def ppo_compiled():
        compiled(lp, v).backward()

    P = 4096
    c, r = randn(P).requires_grad_(), randn(P).requires_grad_()

    def bt(backend):
        def step():
            loss, _ = rk.bt_loss(c, r, backend=backend)
            loss.backward(ones)
        return step

    bt_compiled = torch.compile(lambda c_, r_: ref_bt.bt_loss(c_, r_)[0])

    levels = torch.randint(0, 7, (P,), generator=gen, device=device)
    th = (torch.arange(6, device=device, dtype=torch.float32) - 2.5).requires_grad_()

    def score(backend):  # validate=False: the level check is a host sync by design
        def step():
            loss, _ = rk.score_loss(c, levels, kind="ordinal", thresholds=th, validate=False, backend=backend)
            loss.backward(ones)
        return step

    score_compiled = torch.compile(lambda c_, t_: ref_score.ordinal_loss(c_, levels, t_)[0])

    cases = [("ppo 64x4096 fp32 fwd+bwd", "torch.compile", ppo_compiled),
             ("bt P=4096 fwd+bwd", "torch.compile", lambda: bt_compiled(c, r).backward()),
             ("score ordinal P=4096 K=7 fwd+bwd", "torch.compile", lambda: score_compiled(c, th).backward())]
    backends = [b for b in ("cuda", "triton") if b in rk.available_backends(device)]
    for b in backends:
        cases += [("ppo 64x4096 fp32 fwd+bwd", b, ppo_kernels(b)), ("bt P=4096 fwd+bwd", b, bt(b)),
                  ("score ordinal P=4096 K=7 fwd+bwd", b, score(b))]
    for gb, gt in ((64, 4096), (128, 4096), (16, 32768)):
        gr, gv = randn(gb, gt), randn(gb, gt)
        gm = torch.rand(gb, gt, generator=gen, device=device) < 0.9
        for b in backends:
            cases.append(("gae %dx%d" % (gb, gt), b,
                          lambda gr=gr, gv=gv, gm=gm, b=b: rk.gae(gr, gv, gm, gamma=0.99, lam=0.95, backend=b)))
    return cases


def gpu_table(device):
    rows, records = [], []
    for case, provider, fn in gpu_cases(device):
        wall, gpu, kernels, syncs = gpu_measure(fn)
        target = GPU_TARGETS.get((case, provider), {})
        got = {"wall_us": wall * 1e6, "gpu_us": gpu * 1e6, "kernels": kernels}
        verdict = ", ".join("%s %s (<= %g)" % (k, "met" if got[k] <= bound else "MISSED", bound)
                            for k, bound in target.items())
        rows.append([case, provider, fmt_time(wall), fmt_time(gpu), "%.1f" % kernels, syncs, verdict])
        records.append(_record(provider=provider, op=case, mode="gpu", device=device, median_s=wall, gpu_s=gpu,
                               kernels=kernels, syncs=syncs, verdict=verdict))
    # the triton walls against the cuda ones (target: within 1.5x), and the PPO step against
    # torch.compile of the reference (target: at least 3x faster)
    walls = {(r["op"], r["provider"]): r["median_s"] for r in records}
    for case in sorted({r["op"] for r in records}):
        if (case, "cuda") in walls and (case, "triton") in walls:
            ratio = walls[(case, "triton")] / walls[(case, "cuda")]
            rows.append([case, "triton / cuda wall", "%.2fx" % ratio, "", "", "",
                         "met (<= 1.5x)" if ratio <= 1.5 else "MISSED (<= 1.5x)"])
    ppo = "ppo 64x4096 fp32 fwd+bwd"
    if (ppo, "cuda") in walls:
        speedup = walls[(ppo, "torch.compile")] / walls[(ppo, "cuda")]
        rows.append([ppo, "torch.compile / cuda wall", "%.2fx" % speedup, "", "", "",
                     "met (>= 3x)" if speedup >= 3 else "MISSED (>= 3x)"])
    print_table("GPU steps on %s: wall per call back to back, GPU time and kernels per call (torch.profiler), "
                "host syncs per call" % torch.cuda.get_device_name(0),
                ["case", "provider", "wall", "GPU time", "kernels", "syncs", "targets"], rows)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=None)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the CPU table (median)")
    p.add_argument("--calls", type=int, default=2000, help="forward calls per case per round")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = cpu_table(args.rounds, args.calls)
    finally:
        torch.set_num_threads(threads)
    if torch.device(args.device).type == "cuda":
        records += gpu_table(args.device)
    if args.csv:
        write_csv(args.csv, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
