"""Run every family's benchmark (or one) on this device and file the results.

    python benchmarks/run.py                    # every benchmarks/bench_<family>.py
    python benchmarks/run.py --family gae       # one family
    python benchmarks/run.py --family losses    # bench_losses.py: the ppo, bt and score families
    python benchmarks/run.py --out /tmp/res     # somewhere else than benchmarks/results/<device>/

Each family's script prints its markdown table (kept as <family>.md) and writes its rows
as <family>.csv; a <family>.png plot is drawn when matplotlib is importable. meta.json
stamps the folder with the device, versions, the git commit and a hash of the kernel
sources, plus the copy bandwidth (and, on a GPU, the bf16 matmul rate) measured in this
same run, from which floors are computed.
"""

import argparse
import csv
import datetime
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import median_time  # noqa: E402

KERNEL_SOURCES = ("csrc", "rlhf_kernels")
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".h", ".cuh")


def families():
    return sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))


def source_hash():
    """sha256 over the kernel sources (paths and contents, in sorted order)."""
    h = hashlib.sha256()
    paths = []
    for top in KERNEL_SOURCES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(SOURCE_SUFFIXES)]
    for p in sorted(paths):
        h.update(os.path.relpath(p, ROOT).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def device_slug(device):
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu-%dcore" % (os.cpu_count() or 1)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measure_ceilings(device):
    """Copy bandwidth (bytes read + written per second) and, on a GPU, bf16 matmul FLOP/s."""
    out = {}
    n = (256 if torch.device(device).type == "cuda" else 32) * 1024 * 1024 // 4
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device=device, warmup=3, repeats=20)
    out["copy_bytes_per_s"] = 2 * n * 4 / t
    if torch.device(device).type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        t = median_time(lambda: a @ b, device=device, warmup=3, repeats=10)
        out["bf16_matmul_flop_per_s"] = 2 * 8192 ** 3 / t
    return out


def meta(device, ceilings):
    import importlib.metadata
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    on_gpu = torch.device(device).type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "device": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "commit": git("rev-parse", "HEAD"),
        "commit_dirty_kernels": bool(git("status", "--porcelain", "--", *KERNEL_SOURCES)),
        "source_hash": source_hash(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **ceilings,
    }


def _case(row):
    shape = row.get("shape") or " ".join("%s=%s" % (k, row[k]) for k in ("N", "H", "V") if row.get(k))
    return tuple(c for c in (row.get("op", ""), shape, row.get("dtype", ""), row.get("mode", "")) if c)


def _seconds(row):
    """The median time of a CSV row in seconds: `median_s`, or `median` with a unit."""
    if row.get("median_s"):
        return float(row["median_s"])
    m = re.match(r"\s*([0-9.]+)\s*(s|ms|us)\s*$", row.get("median", "") or "")
    return float(m.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[m.group(2)] if m else None


def plot(csv_path, png_path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if _seconds(r) is not None]
    if not rows:
        return False
    cases = []
    for r in rows:
        key = _case(r)
        if key not in cases:
            cases.append(key)
    providers = []
    for r in rows:
        if r["provider"] not in providers:
            providers.append(r["provider"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        xs, ys = [], []
        for j, case in enumerate(cases):
            for r in rows:
                if r["provider"] == prov and _case(r) == case:
                    xs.append(j + i * width)
                    ys.append(_seconds(r) * 1e3)
        ax.bar(xs, ys, width, label=prov)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([" ".join(case) for case in cases], rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=families(), action="append", help="run only this family (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per family")
    args, extra = p.parse_known_args(argv)
    out = args.out or os.path.join(HERE, "results", device_slug(args.device))
    os.makedirs(out, exist_ok=True)
    ceilings = measure_ceilings(args.device)
    info = meta(args.device, ceilings)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(info, f, indent=1)
    print("device %s  commit %s  source_hash %s" % (info["device"], info["commit"][:12], info["source_hash"][:12]))
    print("copy bandwidth %.0f GB/s" % (ceilings["copy_bytes_per_s"] / 1e9)
          + ("  bf16 matmul %.0f TFLOP/s" % (ceilings["bf16_matmul_flop_per_s"] / 1e12)
             if "bf16_matmul_flop_per_s" in ceilings else ""))
    env = dict(os.environ, RLHF_BENCH_COPY_BPS=str(ceilings["copy_bytes_per_s"]))
    if "bf16_matmul_flop_per_s" in ceilings:
        env["RLHF_BENCH_MATMUL_FLOPS"] = str(ceilings["bf16_matmul_flop_per_s"])
    status = {}
    for fam in args.family or families():
        csv_path = os.path.join(out, fam + ".csv")
        cmd = [sys.executable, os.path.join(HERE, "bench_%s.py" % fam), "--device", args.device,
               "--csv", csv_path] + extra
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, cwd=ROOT)
            rc, text = proc.returncode, proc.stdout + (("\n" + proc.stderr) if proc.returncode else "")
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(text)
        with open(os.path.join(out, fam + ".md"), "w") as f:
            f.write(text)
        plotted = os.path.exists(csv_path) and plot(csv_path, os.path.join(out, fam + ".png"),
                                                    "%s on %s" % (fam, info["gpu"] or info["device"]))
        status[fam] = ("ok" if rc == 0 else "FAILED (%s)" % rc, time.time() - t0, plotted)
    print("\n### summary (%s)\n" % out)
    for fam, (st, secs, plotted) in status.items():
        print("  %-16s %s in %.0f s%s" % (fam, st, secs, ", plot written" if plotted else ""))
    return 0 if all(s[0] == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
