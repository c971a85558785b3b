"""Measuring and filing `python -m rlhf_trainer bench`: each mode's timed steps, peak memory
and largest micro-batch, then the markdown table, CSV, PNG and meta.json (see bench.py)."""

import ctypes
import dataclasses
import gc
import json
import os
import re
import statistics

import torch

import rlhf_kernels as rk

from rlhf_trainer.bench_step import build_trainer, ppo_step, qwen2_config, sync

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("rollout", "logprobs", "update", "other")
PHASE_NAMES = {"rollout": "rollout", "logprobs": "log-prob passes", "update": "update", "other": "other"}
# The targets for kernels on vs off on an H100/H200.
TARGETS = {"step": 1.3, "memory": 2.0, "micro_batch": 2.0}


def device_slug(device):
    """benchmarks/run.py's folder name for this device."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-%dcore" % (os.cpu_count() or 1)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _rss_bytes(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def memory_start(device):
    """Reset the peak counter; -> memory in use now (bytes, or None where unknown)."""
    _release(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return None
    return _rss_bytes("VmRSS")


def memory_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss_bytes("VmHWM")


def memory_now(device):
    """-> (in use now, peak since the last ``memory_start``) in bytes: allocated CUDA memory on a
    GPU; on the CPU the resident set (VmRSS) and its peak (VmHWM), read from /proc/self/status
    (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    return _rss_bytes("VmRSS"), _rss_bytes("VmHWM")


def micro_step(trainer, mb, gen):
    """The trainer's log-prob passes and scoring of ``mb`` random sequences, then one
    micro-batch's loss (``micro_loss``: policy and value) and its backward."""
    b, device = trainer.bench, trainer.device
    prompts = torch.randint(1, b.vocab, (mb, b.prompt_len), generator=gen, device=device)
    responses = torch.randint(1, b.vocab, (mb, b.response_len), generator=gen, device=device)
    batch = trainer.score_rollout(torch.zeros(mb, dtype=torch.long), prompts, responses)
    loss, _, _ = trainer.micro_loss(batch, torch.arange(mb), batch["mask"].sum())
    loss.backward()


def largest_micro_batch(trainer, cap):
    """Double the micro-batch from 1 until one update micro-step (the log-prob passes and
    the policy and value forward + backward of that many sequences) runs out of memory.
    -> (largest that fitted, sizes tried, whether the search stopped at ``cap`` instead)."""
    tried, best, mb = [], 0, 1
    device, kept = trainer.device, trainer.p.micro_batch
    g = torch.Generator(device=device).manual_seed(trainer.bench.seed)
    try:
        while mb <= cap:
            tried.append(mb)
            trainer.p.micro_batch = mb   # the log-prob passes in one chunk of mb
            try:
                micro_step(trainer, mb, g)
                sync(device)
                best = mb
            except torch.OutOfMemoryError:
                return best, tried, False
            finally:
                for opt, _ in trainer._optimizers():
                    opt.zero_grad(set_to_none=True)
                _release(device)
            mb *= 2
    finally:
        trainer.p.micro_batch = kept
    return best, tried, True


MODES = ("off", "on")


def timed_step(mode, trainer, cfg, device, i, warmup):
    """One PPO step of ``mode``'s trainer with its peak memory; prints a line."""
    start_mem = memory_start(device)
    r = ppo_step(trainer)
    r["peak_mem"], r["start_mem"] = memory_peak(device), start_mem
    tag = "warm-up" if i < warmup else "step %d" % (i - warmup + 1)
    print("kernels %-3s %-8s %s  peak %s  policy loss %+.4f  value loss %.4f" % (
        mode, tag, "  ".join("%s %.3f s" % (k, r[k]) for k in ("step",) + PHASES),
        fmt_bytes(r["peak_mem"]), r["policy_loss"], r["value_loss"]), flush=True)
    return r


def summary(results, cfg):
    """Medians of the measured steps' times; the largest peak memory."""
    row = {k: statistics.median(r[k] for r in results) for k in ("step",) + PHASES}
    row["tokens_per_s"] = cfg.batch * cfg.response_len / row["step"]
    known = [r for r in results if r["peak_mem"] is not None and r["start_mem"] is not None]
    row["peak_mem"] = max(r["peak_mem"] for r in known) if known else None
    row["start_mem"] = max(r["start_mem"] for r in known) if known else None
    row["peak_extra"] = max(r["peak_mem"] - r["start_mem"] for r in known) if known else None
    row["policy_loss"], row["value_loss"] = results[-1]["policy_loss"], results[-1]["value_loss"]
    row["max_micro_batch"], row["tried"], row["capped"] = None, [], False
    row["raw"] = results
    return row


def paired(off, on, seconds):
    """The median over measured steps of off's time / on's, steps paired by index (adjacent
    in time on the CPU, where the steps alternate, so that a drifting machine cancels out)."""
    ratios = [seconds(a) / seconds(b) for a, b in zip(off["raw"], on["raw"]) if seconds(a) > 0 and seconds(b) > 0]
    return statistics.median(ratios) if ratios else None


def run_modes(cfg, device, dtype, steps, warmup, search_cap, alternate=None):
    """Both modes' steps -> {"off": row, "on": row}. On a GPU each mode runs alone (its own
    models only, so its peak memory and largest micro-batch are its own), then the next. On
    the CPU, a shared machine whose speed drifts, the two modes' steps alternate (off, on,
    then on, off, ...) with both modes' models resident; the memory figure there is each
    step's peak over its start. ``alternate`` overrides that choice (tests run the GPU's
    schedule on the CPU)."""
    results = {m: [] for m in MODES}
    if alternate is None:
        alternate = device.type != "cuda"
    if alternate:
        states = {m: build_trainer(cfg, device, dtype, m) for m in MODES}
        for i in range(warmup + steps):
            for m in (MODES if i % 2 == 0 else MODES[::-1]):
                r = timed_step(m, states[m], cfg, device, i, warmup)
                if i >= warmup:
                    results[m].append(r)
        del states
        _release(device)
        return {m: summary(results[m], cfg) for m in MODES}
    rows = {}
    for m in MODES:
        state = build_trainer(cfg, device, dtype, m)
        for i in range(warmup + steps):
            r = timed_step(m, state, cfg, device, i, warmup)
            if i >= warmup:
                results[m].append(r)
        rows[m] = summary(results[m], cfg)
        if search_cap > 0:
            row = rows[m]
            row["max_micro_batch"], row["tried"], row["capped"] = largest_micro_batch(state, search_cap)
            print("kernels %-3s largest micro-batch %d (tried %s%s)" % (
                m, row["max_micro_batch"], row["tried"], "; stopped at --max-micro-batch" if row["capped"] else ""),
                flush=True)
        del state
        _release(device)
    return rows


def fmt_bytes(n):
    return "n/a" if n is None else "%.0f MiB" % (n / 2 ** 20) if n < 2 ** 30 else "%.2f GiB" % (n / 2 ** 30)


def ratio(a, b):
    return a / b if a and b else None


def fx(r):
    return "n/a" if r is None else "%.2fx" % r


def comparison(rows, device):
    """Lines comparing on with off, and the targets where they apply (a GPU)."""
    off, on = rows["off"], rows["on"]
    mem_key = "peak_mem" if device.type == "cuda" else "peak_extra"
    figures = {"step": paired(off, on, lambda r: r["step"]), "memory": ratio(off[mem_key], on[mem_key]),
               "micro_batch": ratio(on["max_micro_batch"], off["max_micro_batch"])}
    train = paired(off, on, lambda r: r["step"] - r["rollout"])
    lines = ["kernels on vs off (medians of the per-step ratios): step %s faster; without the rollout (which the "
             "kernels do not touch) %s: log-prob passes %s, update %s, other %s" % (
                 fx(figures["step"]), fx(train), *(fx(paired(off, on, lambda r, k=k: r[k]))
                                                   for k in ("logprobs", "update", "other")))]
    if device.type == "cuda":
        memory = "peak memory %s lower; over the step's start %s lower" % (
            fx(figures["memory"]), fx(ratio(off["peak_extra"], on["peak_extra"])))
    else:
        memory = ("peak RSS over the step's start %s lower (the absolute peaks hold both modes' models: the steps "
                  "alternate)" % fx(figures["memory"]))
    if figures["micro_batch"]:
        memory += "; largest micro-batch %s larger%s" % (fx(figures["micro_batch"]),
                                                         " (on stopped at --max-micro-batch)" if on["capped"] else "")
    lines.append(memory)
    names = {"step": "step time at least %.1fx faster", "memory": "peak memory at least %.0fx lower",
             "micro_batch": "largest micro-batch at least %.0fx larger"}
    for key, target in TARGETS.items():
        what = names[key] % target
        if device.type != "cuda":
            lines.append("target (H100/H200): %s: not measured here (a CPU run)" % what)
        elif figures[key] is None:
            lines.append("target (H100/H200): %s: not measured" % what)
        else:
            verdict = "met" if figures[key] >= target else "MISSED"
            if key == "micro_batch" and on["capped"] and verdict != "met":
                verdict = "not settled (on stopped at --max-micro-batch: raise it)"
            lines.append("target (H100/H200): %s: %.2fx, %s" % (what, figures[key], verdict))
    return lines


def table(rows, cfg, device, dtype, n_params, steps, warmup):
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else "%s, %d torch threads" % (device_slug(device), torch.get_num_threads()))
    mem = "peak allocated" if device.type == "cuda" else "peak RSS"
    out = ["### PPO step, kernels on vs off (%s, %s)" % (name, str(dtype).replace("torch.", "")), "",
           "Qwen2 architecture, random init: H=%d, %d layers, V=%d, %.0fM parameters per model; %d prompts x %d "
           "samples, prompt %d + response %d tokens; micro-batch %d, %d mini-batch(es), %d PPO epoch(s); medians of "
           "%d steps after %d warm-up" % (cfg.hidden, cfg.layers, cfg.vocab, n_params / 1e6, cfg.prompts, cfg.samples,
                                          cfg.prompt_len, cfg.response_len, cfg.micro_batch, cfg.mini_batches,
                                          cfg.ppo_epochs, steps, warmup), "",
           "| kernels | step | rollout | log-prob passes | update | other | response tokens/s | %s | "
           "at step start | largest micro-batch |" % mem,
           "|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ("off", "on"):
        r = rows[mode]
        out.append("| %s | %s | %s | %s | %s | %s | %.0f | %s | %s | %s |" % (
            mode, *("%.3f s" % r[k] for k in ("step",) + PHASES), r["tokens_per_s"], fmt_bytes(r["peak_mem"]),
            fmt_bytes(r["start_mem"]), "not searched" if r["max_micro_batch"] is None
            else ("at least %d" if r["capped"] else "%d") % r["max_micro_batch"]))
    return out


def write_csv(path, rows, cfg, device, dtype):
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernels", "device", "dtype", "batch", "prompt_len", "response_len", "micro_batch", "step_s",
                    "rollout_s", "logprobs_s", "update_s", "other_s", "tokens_per_s", "peak_mem_bytes",
                    "start_mem_bytes", "peak_over_start_bytes", "max_micro_batch", "policy_loss", "value_loss"])
        for mode in ("off", "on"):
            r = rows[mode]
            w.writerow([mode, device_slug(device), str(dtype).replace("torch.", ""), cfg.batch, cfg.prompt_len,
                        cfg.response_len, cfg.micro_batch] + [r[k] for k in ("step",) + PHASES]
                       + [r["tokens_per_s"], r["peak_mem"], r["start_mem"], r["peak_extra"], r["max_micro_batch"],
                          r["policy_loss"], r["value_loss"]])


def plot(path, rows, title, mem_label):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = ["off", "on"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    left = [0.0, 0.0]
    for phase in PHASES:
        widths = [rows[m][phase] for m in modes]
        a.barh(modes, widths, left=left, label=PHASE_NAMES[phase])
        left = [x + w for x, w in zip(left, widths)]
    a.set_xlabel("seconds per PPO step (median)")
    a.set_ylabel("kernels")
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4)
    key = "peak_mem" if mem_label == "peak allocated" else "peak_extra"
    b.bar(modes, [(rows[m][key] or 0) / 2 ** 20 for m in modes], color=["tab:gray", "tab:green"])
    b.set_ylabel("%s (MiB)" % (mem_label if key == "peak_mem" else mem_label + " over the step's start"), fontsize=8)
    b.set_xlabel("kernels")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def meta(device, dtype, cfg, args):
    info = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "device": device_slug(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "cuda": torch.version.cuda, "config": dataclasses.asdict(cfg), "steps": args.steps,
            "warmup": args.warmup, "torch_threads": torch.get_num_threads(),
            "linear_policy_loss": hasattr(rk, "linear_policy_loss")}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    run_py = os.path.join(ROOT, "benchmarks", "run.py")
    if os.path.exists(run_py):  # in a checkout: the commit and kernel source hash, as run.py stamps them
        import importlib.util
        spec = importlib.util.spec_from_file_location("_bench_run", run_py)
        run = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run)
        info.update(commit=run.git("rev-parse", "HEAD"),
                    commit_dirty_kernels=bool(run.git("status", "--porcelain", "--", *run.KERNEL_SOURCES)),
                    source_hash=run.source_hash())
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15_min_at_end"] = [round(x, 2) for x in os.getloadavg()]
    import datetime
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info




def write_report(rows, cfg, device, dtype, args, out):
    """Print the table and comparison; write ppo_step.{md,csv,png,meta.json} under ``out``."""
    from transformers import Qwen2ForCausalLM
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Qwen2ForCausalLM(qwen2_config(cfg)).parameters())
    lines = table(rows, cfg, device, dtype, n_params, args.steps, args.warmup) + [""] + comparison(rows, device)
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        lines.append("CPU load average (1, 5, 15 min) at the end: %.1f, %.1f, %.1f on %d cores (other jobs share "
                     "the machine when it exceeds the cores)" % (*os.getloadavg(), os.cpu_count() or 1))
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ppo_step.md"), "w") as f:
        f.write(text)
    write_csv(os.path.join(out, "ppo_step.csv"), rows, cfg, device, dtype)
    mem_label = "peak allocated" if device.type == "cuda" else "peak RSS"
    plot(os.path.join(out, "ppo_step.png"), rows, "PPO step on %s: kernels off vs on" % device_slug(device), mem_label)
    with open(os.path.join(out, "ppo_step.meta.json"), "w") as f:
        json.dump(meta(device, dtype, cfg, args), f, indent=1)
    print("wrote %s/ppo_step.{md,csv,png,meta.json}" % out)
