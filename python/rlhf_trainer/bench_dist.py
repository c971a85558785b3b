"""``torchrun --nproc_per_node=N -m rlhf_trainer bench``: the whole PPO step, data-parallel.

The bench's kernels-on trainer (``bench_step.BenchTrainer``, a ``PPOTrainer``) under torchrun:
its models sharded with FSDP2, each rank generating its share of the rollout, the scored batch
gathered, each rank updating on its share of every minibatch with gradients summed over the ranks. Rank 0
prints, per measured step, the slowest rank's step time, the step's response tokens over all
ranks per second, and every rank's peak memory (``bench_report.memory_peak``: allocated CUDA
memory on a GPU, the process's peak resident set on the CPU), and writes ``ppo_step_dist.json``.

Rank 0 also prints every rank's memory after each phase (``PhaseMemory``): before the models
are built (the process with torch and transformers), after they are built and sharded, at the
step's start (freed heap returned), after the rollout, after the log-prob passes and scoring,
after the first minibatch's backward (gradients exist), after the first optimizer step (Adam's
state exists from the first step on) and at the step's end, each with the peak so far; on the CPU the resident set from /proc/self/status (VmRSS, VmHWM), on a
GPU allocated memory. These are what docs/distributed.md compares term by term with the
sharded state FSDP2 predicts.
"""

import json
import os
import statistics

from rlhf_trainer import parallel


# (key, what it is): the phases PhaseMemory marks in a step, in order
PHASES = (("start", "step start (freed heap returned)"), ("rollout", "after the rollout (generation)"),
          ("scored", "after the log-prob passes and scoring"), ("backward", "after the first backward"),
          ("optimizer", "after the first optimizer step"), ("end", "step end"))
BUILT = (("process", "the process before the models"), ("built", "models built and sharded"))


class PhaseMemory:
    """This rank's memory at named points: (now, peak so far) in bytes, from
    ``bench_report.memory_now``. ``watch(trainer)`` marks "backward" before the first
    optimizer's first step of each step (the first minibatch's gradients exist) and "optimizer"
    after the last optimizer's first step, through the optimizers' step hooks."""

    def __init__(self, device):
        self.device, self.marks = device, {}

    def mark(self, name):
        if name not in self.marks:
            from rlhf_trainer.bench_report import memory_now
            self.marks[name] = memory_now(self.device)

    def watch(self, trainer):
        opts = [opt for opt, _ in trainer._optimizers()]
        opts[0].register_step_pre_hook(lambda *a: self.mark("backward"))
        opts[-1].register_step_post_hook(lambda *a: self.mark("optimizer"))

    def gathered(self, names):
        """-> {name: {"now": [bytes per rank], "peak": [...]}} over every rank (a collective)."""
        w, r = parallel.world(), parallel.rank()
        flat = [0.0] * (2 * w * len(names))
        for k, name in enumerate(names):
            now, peak = self.marks.get(name, (None, None))
            flat[2 * (k * w + r)], flat[2 * (k * w + r) + 1] = float(now or 0), float(peak or 0)
        flat = parallel.all_sum(flat)
        return {name: {"now": flat[2 * k * w:2 * (k + 1) * w:2], "peak": flat[2 * k * w + 1:2 * (k + 1) * w:2]}
                for k, name in enumerate(names)}


def memory_lines(phases, built=None, cuda=False):
    """Rank 0's table of every rank's memory per phase (GiB): now, and the peak so far."""
    w = len(next(iter(phases.values()))["now"])
    lines = ["  memory per rank, GiB: %s after each phase (its peak so far)" % (
                 "allocated CUDA memory" if cuda else "the resident set"),
             "  %-40s" % "phase" + "".join("%18s" % ("rank %d" % k) for k in range(w))]
    rows = [(what, built[key]) for key, what in BUILT] if built else []
    rows += [(what, phases[key]) for key, what in PHASES]
    for what, m in rows:
        lines.append("  %-40s" % what + "".join("  %7.2f (%6.2f)" % (n / 2 ** 30, p / 2 ** 30)
                                                for n, p in zip(m["now"], m["peak"])))
    return lines


def run(cfg, device, dtype, steps, warmup, out):
    """The kernels-on trainer under torchrun (``PPOTrainer`` shards itself and splits the rollout),
    timed by ``bench_step.ppo_step``; rank 0 prints and writes ppo_step_dist.json."""
    from rlhf_trainer.bench_report import fmt_bytes, memory_peak, memory_start
    from rlhf_trainer.bench_step import build_trainer, ppo_step
    w, r = parallel.world(), parallel.rank()
    mem = PhaseMemory(device)
    mem.mark("process")   # torch, transformers and the kernels imported
    trainer = build_trainer(cfg, device, dtype, "on")
    mem.mark("built")   # the peak here is the build's (one rank at a time: a full copy, then shards)
    built = mem.gathered([key for key, _ in BUILT])
    mem.watch(trainer)
    rows = []
    for i in range(warmup + steps):
        start = memory_start(device)
        mem.marks = {}
        mem.mark("start")
        t = ppo_step(trainer, mem.mark)
        peak = memory_peak(device)
        mem.mark("end")
        phases = mem.gathered([key for key, _ in PHASES])
        per_rank = [0.0] * (3 * w)
        per_rank[3 * r:3 * r + 3] = [t["step"], float(peak or 0), float(start or 0)]
        per_rank = parallel.all_sum(per_rank)     # every rank's figures, in its own slots
        step_s = max(per_rank[0::3])
        row = {"step_s": step_s, "tokens_per_s": cfg.batch * cfg.response_len / step_s,
               "peak_bytes": per_rank[1::3], "start_bytes": per_rank[2::3],
               "phases_rank0": {k: t[k] for k in ("rollout", "logprobs", "update", "other")},
               "memory_bytes": phases}
        tag = "warm-up" if i < warmup else "step %d" % (i - warmup + 1)
        if parallel.is_main():
            print("%d processes %-8s step %.3f s  %.3g tokens/s  peak per rank %s" % (
                w, tag, step_s, row["tokens_per_s"], ", ".join(fmt_bytes(b) for b in row["peak_bytes"])), flush=True)
            print("\n".join(memory_lines(phases, built if i == 0 else None, device.type == "cuda")), flush=True)
        if i >= warmup:
            rows.append(row)
    summary = {"world_size": w, "device": str(device.type), "dtype": str(dtype).replace("torch.", ""),
               "config": {k: getattr(cfg, k) for k in ("hidden", "layers", "vocab", "prompts", "samples",
                                                      "prompt_len", "response_len", "micro_batch")},
               "median_step_s": statistics.median(x["step_s"] for x in rows),
               "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rows),
               "peak_bytes_per_rank": [max(x["peak_bytes"][k] for x in rows) for k in range(w)],
               "built_bytes": built, "steps": rows}
    if parallel.is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "ppo_step_dist.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("%d processes: %.3g response tokens/s (median of %d steps); peak memory per rank: %s; written to %s"
              % (w, summary["tokens_per_s"], len(rows),
                 ", ".join(fmt_bytes(b) for b in summary["peak_bytes_per_rank"]),
                 os.path.join(out, "ppo_step_dist.json")))
    return summary
