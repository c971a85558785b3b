"""Timing and table helpers shared by the benchmarks.

CPU: wall clock (time.perf_counter) around each call. CUDA: CUDA events around each
call, after warm-up, with a device synchronize per repeat. Always the median.
"""

import statistics
import time

import torch


def median_time(fn, *, device="cpu", warmup=3, repeats=10, min_time=0.0):
    """Median seconds of ``fn()`` over ``repeats`` runs (more while under ``min_time`` total)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        while len(times) < repeats or sum(times) < min_time:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        while len(times) < repeats or sum(times) < min_time:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/self/status" % field)


def peak_extra_bytes(fn, device="cpu"):
    """Peak memory of one ``fn()`` call over what was in use before it. CUDA:
    torch.cuda.max_memory_allocated() over memory_allocated(). CPU: the peak resident set
    size (VmHWM, reset through /proc/self/clear_refs) over the resident size before the call;
    run it in a fresh process so that the allocator's cached pages do not hide the peak."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return _rss_bytes("VmHWM") - base


def run_child(script, provider, mode, options):
    """Run ``script --child PROVIDER MODE --key value ...`` in a fresh process (so its peak
    memory is its own) and return the JSON object on its last line, or {"error": why}."""
    import json
    import subprocess
    import sys
    cmd = [sys.executable, script, "--child", provider, mode]
    for key, value in options.items():
        cmd += ["--" + key, str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["failed"]
        return {"error": tail[0][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_here(measure, provider, mode, *args):
    """``measure(provider, mode, *args)`` in this process (on a GPU, where the allocator's
    statistics isolate each provider's peak memory), as ``run_child`` reports it: the result,
    or {"error": why}; the provider's memory is released before the next one."""
    try:
        return measure(provider, mode, *args)
    except Exception as e:  # a provider that fails is reported in its row, the others still run
        return {"error": ("%s: %s" % (type(e).__name__, e))[:120]}
    finally:
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fmt_time(seconds):
    if seconds >= 1:
        return "%.3f s" % seconds
    if seconds >= 1e-3:
        return "%.3f ms" % (seconds * 1e3)
    return "%.1f us" % (seconds * 1e6)


def print_table(title, header, rows):
    """A markdown table."""
    print("\n### %s\n" % title)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def write_csv(path, records):
    """Rows (dicts with the same keys) as CSV, for benchmarks/run.py's results folder."""
    import csv
    if not records:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0].keys()))
        w.writeheader()
        w.writerows(records)
