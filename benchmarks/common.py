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
