"""``torchrun --nproc_per_node=N -m rlhf_trainer bench``: the whole PPO step, data-parallel.

Each rank builds the bench's models (policy, frozen reference, value model; ``bench_step``),
one rank at a time, shards them with FSDP2 (``parallel.shard``), and runs the kernels-on step on
its share of the prompts (``prompts / N`` prompts x ``samples`` each, its own random prompts):
the rollout (every rank generates ``response_len`` tokens, so the ranks' forwards stay in step),
the log-prob passes, advantages and the update with gradients summed over the ranks. Rank 0
prints, per measured step, the slowest rank's step time, the step's response tokens over all
ranks per second, and every rank's peak memory (``bench_report.memory_peak``: allocated CUDA
memory on a GPU, the process's peak resident set on the CPU), and writes ``ppo_step_dist.json``.
"""

import copy
import json
import os
import statistics

import torch

from rlhf_trainer import parallel
from rlhf_trainer.sequences import root_call


class ShardedOps:
    """The kernels-on ops with the calls that read the LM head's weight directly run as a
    forward of the sharded policy (``root_call``)."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def logprobs(self, policy, *args):
        return root_call(policy, self.ops.logprobs, *args)

    def policy_objective(self, policy, *args):
        return root_call(policy, self.ops.policy_objective, *args)


def build(cfg, device, dtype):
    """This rank's sharded models and an AdamW over their shards."""
    from rlhf_trainer.bench_step import Models, build_models

    def one():
        m = build_models(cfg, device, dtype)
        return (parallel.shard(m.policy), parallel.shard(m.ref), parallel.shard(m.value))
    policy, ref, value = parallel.one_at_a_time(one)
    opt = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=cfg.lr)
    return Models(policy, ref, value, opt)


def run(cfg, device, dtype, steps, warmup, out):
    from rlhf_trainer.bench_ops import OPS
    from rlhf_trainer.bench_report import fmt_bytes, memory_peak, memory_start
    from rlhf_trainer.bench_step import ppo_step
    w, r = parallel.world(), parallel.rank()
    if cfg.prompts % w:
        raise ValueError("bench: %d prompts do not split over %d processes" % (cfg.prompts, w))
    mine = copy.copy(cfg)
    mine.prompts, mine.seed = cfg.prompts // w, cfg.seed + 7919 * r    # this rank's prompts, its own samples
    models = build(mine, device, dtype)
    ops = ShardedOps(OPS["on"]())
    n_params = sum(p.numel() for p in models.policy.parameters())      # this rank's shard
    rows = []
    for i in range(warmup + steps):
        start = memory_start(device)
        t = ppo_step(models, ops, mine, i)
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
    params = parallel.all_sum([0.0] * r + [float(n_params)] + [0.0] * (w - r - 1))
    summary = {"world_size": w, "device": str(device.type), "dtype": str(dtype).replace("torch.", ""),
               "config": {k: getattr(cfg, k) for k in ("hidden", "layers", "vocab", "prompts", "samples",
                                                      "prompt_len", "response_len", "micro_batch")},
               "policy_params_per_rank": params, "median_step_s": statistics.median(x["step_s"] for x in rows),
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
