"""``torchrun --nproc_per_node=N -m rlhf_trainer bench``: the whole PPO step, data-parallel.

The bench's kernels-on trainer (``bench_step.BenchTrainer``, a ``PPOTrainer``) under torchrun:
its models sharded with FSDP2, each rank generating its share of the rollout, the scored batch
gathered, each rank updating on its share of every minibatch with gradients summed over the ranks. Rank 0
prints, per measured step, the slowest rank's step time, the step's response tokens over all
ranks per second, and every rank's peak memory (``bench_report.memory_peak``: allocated CUDA
memory on a GPU, the process's peak resident set on the CPU), and writes ``ppo_step_dist.json``.
"""

import json
import os
import statistics

from rlhf_trainer import parallel


def run(cfg, device, dtype, steps, warmup, out):
    """The kernels-on trainer under torchrun (``PPOTrainer`` shards itself and splits the rollout),
    timed by ``bench_step.ppo_step``; rank 0 prints and writes ppo_step_dist.json."""
    from rlhf_trainer.bench_report import fmt_bytes, memory_peak, memory_start
    from rlhf_trainer.bench_step import build_trainer, ppo_step
    w, r = parallel.world(), parallel.rank()
    trainer = build_trainer(cfg, device, dtype, "on")
    rows = []
    for i in range(warmup + steps):
        start = memory_start(device)
        t = ppo_step(trainer)
        peak = memory_peak(device)
        per_rank = [0.0] * (3 * w)
        per_rank[3 * r:3 * r + 3] = [t["step"], float(peak or 0), float(start or 0)]
        per_rank = parallel.all_sum(per_rank)     # every rank's figures, in its own slots
        step_s = max(per_rank[0::3])
        row = {"step_s": step_s, "tokens_per_s": cfg.batch * cfg.response_len / step_s,
               "peak_bytes": per_rank[1::3], "start_bytes": per_rank[2::3],
               "phases_rank0": {k: t[k] for k in ("rollout", "logprobs", "update", "other")}}
        tag = "warm-up" if i < warmup else "step %d" % (i - warmup + 1)
        if parallel.is_main():
            print("%d processes %-8s step %.3f s  %.0f tokens/s  peak per rank %s" % (
                w, tag, step_s, row["tokens_per_s"], ", ".join(fmt_bytes(b) for b in row["peak_bytes"])), flush=True)
        if i >= warmup:
            rows.append(row)
    summary = {"world_size": w, "device": str(device.type), "dtype": str(dtype).replace("torch.", ""),
               "config": {k: getattr(cfg, k) for k in ("hidden", "layers", "vocab", "prompts", "samples",
                                                      "prompt_len", "response_len", "micro_batch")},
               "median_step_s": statistics.median(x["step_s"] for x in rows),
               "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rows),
               "peak_bytes_per_rank": [max(x["peak_bytes"][k] for x in rows) for k in range(w)], "steps": rows}
    if parallel.is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "ppo_step_dist.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("%d processes: %.0f response tokens/s (median of %d steps); peak memory per rank: %s; written to %s"
              % (w, summary["tokens_per_s"], len(rows),
                 ", ".join(fmt_bytes(b) for b in summary["peak_bytes_per_rank"]),
                 os.path.join(out, "ppo_step_dist.json")))
    return summary
