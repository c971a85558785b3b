"""GAE benchmark: the Python loop popular trainers run, our reference, and our kernels.

    python benchmarks/bench_gae.py                  # shapes for this device
    python benchmarks/bench_gae.py --shapes 64x4096 --repeats 20

Providers:
  python-loop   the per-step loop of TRL/OpenRLHF-style trainers (one set of tensor ops per
                time step over the batch), written here in our own words
  torch         rlhf_kernels' reference backend (also a loop over time, float64)
  cpu           compiled C++ kernel (CPU tensors)
  triton, cuda  GPU kernels (CUDA tensors)
Times are medians; the speedup column is against python-loop measured in the same run. The two
loops take thousands of launches per call on a GPU (seconds at the longest rows), so there they
run at the first shape only, with 3 repeats. Inputs are made on the device by a seeded generator
there.
On a GPU the floor is one pass over the bytes (read rewards, values, mask; write two outputs)
at the device-to-device copy bandwidth measured in the same run.
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmark this checkout's rlhf_kernels, not another install
import rlhf_kernels as rk  # noqa: E402
from common import fmt_time, median_time, print_table, write_csv  # noqa: E402


def python_loop_gae(rewards, values, mask, gamma, lam):
    """The loop trainers run: mask the inputs, walk back over T one column at a time."""
    values = values * mask
    rewards = rewards * mask
    last = torch.zeros_like(rewards[:, 0])
    out = []
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, advantages + values


def copy_bandwidth(device):
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(256 * 1024 * 1024 // 4, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device=device, warmup=3, repeats=20)
    return 2 * x.numel() * 4 / t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help="comma-separated BxT, e.g. 64x4096,8x512")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-loop", action="store_true", help="skip the slow Python-loop providers")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    shapes = args.shapes or ("64x4096,256x1024,16x32768" if on_gpu else "64x4096,8x512")
    shapes = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]
    repeats = args.repeats or (50 if on_gpu else 7)
    gamma, lam = 1.0, 0.95
    bw = None
    if on_gpu:  # benchmarks/run.py passes the bandwidth it measured in the same run
        bw = float(os.environ.get("RLHF_BENCH_COPY_BPS", 0)) or copy_bandwidth(device)

    gen = torch.Generator(device=device).manual_seed(0)
    rows, records, summary = [], [], []
    for i, (B, T) in enumerate(shapes):
        r = torch.randn(B, T, generator=gen, device=device)
        v = torch.randn(B, T, generator=gen, device=device)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen, device=device)
        m = torch.arange(T, device=device)[None, :] < lengths[:, None]   # right-padded responses
        providers = []
        if not args.no_loop and (i == 0 or not on_gpu):
            providers.append(("python-loop", lambda: python_loop_gae(r, v, m, gamma, lam)))
            providers.append(("torch", lambda: rk.gae(r, v, m, gamma=gamma, lam=lam, backend="torch")))
        for name in rk.available_backends(device):
            if name != "torch":
                providers.append((name, lambda name=name: rk.gae(r, v, m, gamma=gamma, lam=lam, backend=name)))
        nbytes = B * T * (4 + 4 + 1 + 4 + 4)
        times, counts = {}, {}
        for name, fn in providers:
            # the loops take thousands of launches per call on a GPU: fewer repeats there
            counts[name] = (3 if on_gpu else min(repeats, 10)) if name in ("python-loop", "torch") else repeats
            times[name] = median_time(fn, device=device, warmup=1 if counts[name] <= 3 else 2, repeats=counts[name])
        base = times.get("python-loop")
        for name, _ in providers:
            t = times[name]
            row = [name, "%dx%d" % (B, T), fmt_time(t), "%.1f" % (nbytes / t / 1e9)]
            if bw:
                floor = nbytes / bw
                row.append("%.0f%%" % (100 * floor / t))
            row.append("%.0fx" % (base / t) if base else "-")
            rows.append(row)
            records.append({"family": "gae", "op": "gae", "provider": name, "shape": "%dx%d" % (B, T),
                            "dtype": "float32", "median_s": t, "gb_per_s": nbytes / t / 1e9,
                            "floor_s": nbytes / bw if bw else "",
                            "speedup_vs_eager": times["torch"] / t if "torch" in times else "",
                            "speedup_vs_python_loop": base / t if base else ""})
        if base and "cpu" in times:
            summary.append("cpu vs python-loop at %dx%d: %.0fx (medians of %d and %d runs, side by side)"
                           % (B, T, base / times["cpu"], counts["cpu"], counts["python-loop"]))
    header = ["provider", "BxT", "median", "GB/s"] + (["% of floor"] if bw else []) + ["vs python-loop"]
    title = "GAE on %s" % (torch.cuda.get_device_name(0) if on_gpu else "CPU (%d threads)" % torch.get_num_threads())
    print_table(title, header, rows)
    if bw:
        print("\ncopy bandwidth measured in this run: %.0f GB/s" % (bw / 1e9))
    for line in summary:
        print(line)
    if args.csv:
        write_csv(args.csv, records)


if __name__ == "__main__":
    main()
