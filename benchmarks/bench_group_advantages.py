"""Critic-free advantages (group_advantages): trainer-style eager code, our reference, and our kernels.

    python benchmarks/bench_group_advantages.py                     # cases for this device
    python benchmarks/bench_group_advantages.py --cases size:4096:16,index:4096 --repeats 200

Cases: size:B:G (groups of G consecutive sequences, group_size) and index:B (each of B
sequences in one of B/16 groups drawn at random: sizes around 16, unsorted int64 ids far apart,
group_index); each with --modes (default grpo and reinforce++).
Providers:
  eager         rlhf_kernels' reference (rlhf_kernels/reference/group_advantages.py) on float32
                rewards, as a trainer would run it
  compile       torch.compile of the same reference (graph breaks where it needs dynamic shapes)
  view-eager    group_size only: the reshape-mean-std code of popular trainers, written here in
                our own words (view(-1, G), mean and std over dim 1, repeat_interleave)
  python-loop   group_index, grpo, CPU only: the per-sequence Python loop over a dict of
                id -> rewards that some trainers run, written here in our own words
  cpu, cuda, triton  our kernels
Times are medians of back-to-back calls; the speedup column is against eager in the same run.
On a GPU the time is CUDA events around one call, and "wall/call" is the host-inclusive time
per call in a loop of calls with one synchronize at the end, next to the same for one
torch.add of two [B] tensors (the target: at most 2x torch.add).
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # benchmark this checkout's rlhf_kernels, not another install
import rlhf_kernels as rk  # noqa: E402
from rlhf_kernels.reference import group_advantages as ref  # noqa: E402
from common import fmt_time, median_time, print_table, write_csv  # noqa: E402


def view_eager(rewards, G, mode, eps):
    """Groups of G consecutive rewards, as reshape-based trainer code computes them."""
    grouped = rewards.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    if mode == "grpo":
        std = grouped.std(dim=1).repeat_interleave(G)
        return (rewards - mean) / (std + eps)
    x = rewards - mean  # reinforce++: then whitened over the batch
    return (x - x.mean()) / (x.std() + eps)


def python_loop_grpo(rewards, index, eps):
    """A dict of id -> rewards filled one sequence at a time, then one sequence at a time again."""
    by_id = defaultdict(list)
    for i in range(len(rewards)):
        by_id[index[i].item()].append(rewards[i])
    stats = {}
    for key, vals in by_id.items():
        t = torch.stack(vals)
        stats[key] = (t.mean(), t.std()) if len(vals) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
    out = rewards.clone()
    for i in range(len(rewards)):
        mean, std = stats[index[i].item()]
        out[i] = (rewards[i] - mean) / (std + eps)
    return out


def ragged_index(B, gen):
    """Each sequence in one of B/16 groups drawn at random; ids far apart (not 0..groups-1)."""
    return torch.randint(0, max(1, B // 16), (B,), generator=gen) * 1000003 + 10 ** 12


def wall_per_call(fn, n):
    """Host-inclusive seconds per call: n calls back to back, one synchronize at the end."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=None, help="comma-separated size:B:G or index:B")
    p.add_argument("--modes", default="grpo,reinforce++")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every provider (default: torch's default)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    cases = args.cases or "size:4096:16,index:4096,size:65536:16,index:65536"
    cases = [c.split(":") for c in cases.split(",")]
    modes = args.modes.split(",")
    repeats = args.repeats or (200 if on_gpu else 100)
    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    rows, records, summary = [], [], []
    for case in cases:
        kind, B = case[0], int(case[1])
        G = int(case[2]) if kind == "size" else None
        shape = "B=%d %s" % (B, "G=%d" % G if G else "ragged")
        if on_gpu:
            r = torch.randn(B, device=device)
            idx = ragged_index(B, gen).to(device) if G is None else None
        else:
            r = torch.randn(B, generator=gen)
            idx = ragged_index(B, gen) if G is None else None
        for mode in modes:
            providers = [("eager", lambda: ref.group_advantages(r, idx, G, mode, eps))]
            compiled = torch.compile(ref.group_advantages)
            providers.append(("compile", lambda: compiled(r, idx, G, mode, eps)))
            if G is not None:
                providers.append(("view-eager", lambda: view_eager(r, G, mode, eps)))
            elif mode == "grpo" and not on_gpu and B <= 4096:
                providers.append(("python-loop", lambda: python_loop_grpo(r, idx, eps)))
            for name in rk.available_backends(device):
                if name != "torch":
                    providers.append((name, lambda name=name: rk.group_advantages(
                        r, idx, group_size=G, mode=mode, eps=eps, backend=name)))
            times, walls = {}, {}
            for name, fn in providers:
                n = 5 if name == "python-loop" else repeats
                times[name] = median_time(fn, device=device, warmup=3, repeats=n)
                if on_gpu and name in ("cuda", "triton"):
                    walls[name] = wall_per_call(fn, repeats)
            add_wall = None
            if on_gpu:
                other = torch.randn(B, device=device)
                add_wall = wall_per_call(lambda: torch.add(r, other), repeats)
            base = times["eager"]
            for name, _ in providers:
                t = times[name]
                row = [name, shape, mode, fmt_time(t), "%.1fx" % (base / t)]
                if on_gpu:
                    row.append("%s (%.2fx add)" % (fmt_time(walls[name]), walls[name] / add_wall) if name in walls
                               else "-")
                rows.append(row)
                records.append({"family": "group_advantages", "op": "group_advantages", "provider": name,
                                "shape": shape, "dtype": "float32", "mode": mode, "median_s": t,
                                "speedup_vs_eager": base / t,
                                "wall_per_call_s": walls.get(name, ""),
                                "add_wall_per_call_s": add_wall if name in walls else ""})
            kernel = "cuda" if "cuda" in times else ("cpu" if "cpu" in times else None)
            if kernel:
                line = "%s vs eager at %s %s: %.1fx (compile: %.1fx)" % (
                    kernel, shape, mode, base / times[kernel], times["compile"] / times[kernel])
                if kernel in walls:
                    line += "; wall/call %.2fx torch.add" % (walls[kernel] / add_wall)
                summary.append(line)
    header = ["provider", "case", "mode", "median", "vs eager"] + (["wall/call"] if on_gpu else [])
    title = "group_advantages on %s" % (torch.cuda.get_device_name(0) if on_gpu
                                        else "CPU (%d threads)" % torch.get_num_threads())
    print_table(title, header, rows)
    for line in summary:
        print(line)
    if args.csv:
        write_csv(args.csv, records)


if __name__ == "__main__":
    main()
