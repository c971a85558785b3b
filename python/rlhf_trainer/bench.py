"""python -m rlhf_trainer bench: what the kernels buy in a whole PPO step.

Runs the trainer's own PPO step (``ppo.PPOTrainer``: rollout, scoring, update) with kernels off
(eager token ops on the model's logits, as a plain trainer has them) and on (rlhf_kernels, from
the hidden states), one mode after the other in this process, each from the same randomly
initialized models (bench_step.py, bench_ops.py), and
reports the medians over ``--steps`` steps after ``--warmup``: step time split into rollout
(HF ``generate``), log-prob passes (old policy, reference, values), update (forward, backward
and optimizer steps over micro-batches) and other (reward, KL penalty, GAE, whitening);
response tokens per second; peak memory; and, on a GPU, the largest micro-batch that fits,
found by doubling until out of memory. Written as ppo_step.md, .csv, .png and
ppo_step.meta.json under benchmarks/results/<device>/ (or --out).

Peak memory: on a GPU, torch.cuda.max_memory_allocated() over the step (everything allocated:
weights, optimizer state, activations). On the CPU, the peak resident set size of the process
over the step (VmHWM, reset through /proc/self/clear_refs after freed heap is returned with
malloc_trim), which counts the same things plus the Python process itself.

The model's shape is the small one on the CPU and Qwen2.5-0.5B's on a GPU unless ``--model``
says otherwise; ``--prompts``, ``--samples``, ``--prompt-len`` and ``--response-len`` override
the batch, ``--layers`` the depth. ``torchrun --nproc_per_node=2 -m rlhf_trainer bench --device
cpu --model 0.5b`` with a tiny batch measures the 0.5B model's memory per rank on the CPU, where
its sharded weights, gradients and Adam state dominate; with ``--layers`` 2 and 6 it gives the
per-layer slope and the rest (docs/distributed.md).
"""

import os
import sys


class BenchError(Exception):
    pass


def add_arguments(p):
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto picks CUDA when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="model dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--small", action="store_true",
                   help="the CPU-sized configuration (the default on the CPU); otherwise Qwen2.5-0.5B's shape, "
                        "8 prompts x 4 samples, 1024-token responses")
    p.add_argument("--model", default="auto", choices=("auto", "small", "0.5b"),
                   help="the model's shape: small (the CPU-sized configuration, as --small) or 0.5b (Qwen2.5-0.5B's, "
                        "with its batch: 8 prompts x 4 samples, 128-token prompts, 1024-token responses); auto: 0.5b "
                        "on CUDA, small on the CPU. With --device cpu, 0.5b and a tiny batch (--prompts, --samples, "
                        "--prompt-len, --response-len) measure the 0.5B model's memory on the CPU: its weights, "
                        "gradients and Adam state dominate (float32: 17.8 GB of them in one process, 8.9 GB per "
                        "process with 2 under torchrun, plus the rest of the step: docs/distributed.md)")
    for flag, what in (("--prompts", "prompts per rollout"), ("--samples", "responses per prompt"),
                       ("--prompt-len", "tokens per prompt"), ("--response-len", "tokens per response")):
        p.add_argument(flag, type=int, help="%s (default: the model's configuration's)" % what)
    p.add_argument("--layers", type=int,
                   help="decoder layers (default: the model's configuration's: 24 for 0.5b, 2 small); fewer layers "
                        "of the 0.5B shape separate its memory into a per-layer slope and the rest (embeddings, "
                        "LM head, the process): docs/distributed.md")
    p.add_argument("--steps", type=int, default=3, help="measured steps per mode (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (default 1)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward (default 8 GPU, 4 small)")
    p.add_argument("--max-micro-batch", type=int, default=512,
                   help="where the doubling search stops (GPU only; 0 skips it)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for a CPU run (default 1: the small models gain nothing from more, "
                        "and a shared CPU makes several threads wait on each other; 0 keeps torch's default)")
    p.add_argument("--out", help="results folder (default benchmarks/results/<device>/)")


def resolve(args):
    """-> (device, dtype, BenchConfig) from the command line, or BenchError."""
    import torch
    from rlhf_trainer.bench_step import GPU_CONFIG, SMALL_CONFIG, BenchConfig
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible to torch (use --device cpu or auto)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = getattr(args, "model", "auto")
    if args.small and model == "0.5b":
        raise BenchError("--small and --model 0.5b ask for two configurations: give one")
    if model == "auto":
        model = "small" if args.small or device.type == "cpu" else "0.5b"
    cfg = BenchConfig(**(SMALL_CONFIG if args.small or model == "small" else GPU_CONFIG))
    sizes = ("prompts", "samples", "prompt_len", "response_len", "micro_batch", "layers")
    for name in ("steps",) + sizes:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise BenchError("--%s must be at least 1, got %d" % (name.replace("_", "-"), value))
        if value is not None and name != "steps":
            setattr(cfg, name, value)
    for name in ("threads", "max_micro_batch", "warmup"):
        if getattr(args, name) < 0:
            raise BenchError("--%s must be at least 0, got %d" % (name.replace("_", "-"), getattr(args, name)))
    from rlhf_trainer.bench_step import trainer_config
    from rlhf_trainer.config import ConfigError
    given = " ".join("--%s %d" % (name.replace("_", "-"), getattr(args, name)) for name in ("prompts", "samples",
                     "micro_batch") if getattr(args, name, None) is not None)
    try:
        ppo = trainer_config(cfg, device, True).section
    except ConfigError as e:   # the micro-batch against the mini-batch: the trainer's own check
        raise BenchError("%s: %s" % (given or "--micro-batch %d" % cfg.micro_batch, e)) from None
    # under torchrun each rank takes an equal share of the rollout and of each minibatch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for what, n in (("rollout", ppo.rollout_batch), ("minibatch", ppo.minibatch)):
        if n % world:
            raise BenchError("%s: the %s's %d sequences are not divisible by the %d processes (the rollout is "
                             "prompts x samples, %d minibatches of it)" % (
                                 given or "--prompts %d --samples %d" % (cfg.prompts, cfg.samples), what, n, world,
                                 cfg.mini_batches))
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device, dtype, cfg


def main(args):
    try:
        device, dtype, cfg = resolve(args)
    except BenchError as e:
        print("bench: %s" % e, file=sys.stderr)
        return 2
    from rlhf_trainer import bench_report as report
    root = report.ROOT
    out = args.out or os.path.join(root if os.path.isdir(os.path.join(root, "benchmarks")) else os.getcwd(),
                                   "benchmarks", "results", report.device_slug(device))
    from rlhf_trainer import parallel
    if parallel.launched():   # torchrun: the kernels-on step, sharded over the ranks (bench_dist.py)
        from rlhf_trainer import bench_dist
        device = parallel.init(device)
        if parallel.is_main():
            print("device %s, %s, %d processes (FSDP2), kernels on" % (report.device_slug(device),
                                                                      str(dtype).replace("torch.", ""),
                                                                      parallel.world()), flush=True)
        bench_dist.run(cfg, device, dtype, args.steps, args.warmup, out)
        return 0
    if device.type != "cuda":
        print("largest micro-batch: not searched on the CPU (doubling until out of memory would exhaust a shared "
              "machine's RAM before any limit is reached); run on a GPU")
    print("device %s, %s, %s configuration; %s" % (
        report.device_slug(device), str(dtype).replace("torch.", ""), "small" if cfg.hidden < 896 else "Qwen2.5-0.5B",
        "kernels off, then on" if device.type == "cuda" else "kernels off and on, steps alternating"), flush=True)
    rows = report.run_modes(cfg, device, dtype, args.steps, args.warmup, args.max_micro_batch)
    report.write_report(rows, cfg, device, dtype, args, out)
    return 0
