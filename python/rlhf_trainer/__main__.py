"""python -m rlhf_trainer demo [--small] [--out DIR] [--config cfg.yaml] [--resume]
python -m rlhf_trainer compare [--small] [--out DIR] [--algos ppo,grpo,...]
python -m rlhf_trainer plot RUN_DIR
python -m rlhf_trainer bench [--small] [--device auto|cpu|cuda] [--dtype ...] [--out DIR]"""

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rlhf_trainer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="reward model + the configured algorithm (PPO by default) on the toy task, "
                                    "against the exact optimum")
    d.add_argument("--config", help="a YAML config (default: the built-in demo config)")
    d.add_argument("--out", help="run directory (default runs/demo-<time>)")
    d.add_argument("--small", action="store_true", help="the smaller CI configuration")
    d.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = sub.add_parser("compare", help="every algorithm with its tuned defaults against one reward model and the "
                                       "exact optimum: a table (markdown + CSV) and figures")
    c.add_argument("--out", help="output directory (default runs/compare-<time>)")
    c.add_argument("--small", action="store_true", help="the smaller CI configuration of every algorithm")
    c.add_argument("--algos", help="comma-separated subset (default: all, in the table's order)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--beta", type=float, help="the KL coefficient of J for every algorithm (default: the config's)")
    c.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the models are tiny; 0 keeps torch's default)")
    pl = sub.add_parser("plot", help="write RUN_DIR/curves.png from RUN_DIR/log.jsonl")
    pl.add_argument("run_dir")
    b = sub.add_parser("bench", help="time PPO steps with kernels on vs off (rollout, log-prob passes, update; "
                                     "peak memory; largest micro-batch)")
    from rlhf_trainer.bench import add_arguments as add_bench_arguments
    add_bench_arguments(b)
    args = p.parse_args(argv)
    if args.cmd == "bench":
        from rlhf_trainer import bench
        return bench.main(args)
    if args.cmd == "demo":
        from rlhf_trainer import demo
        return demo.main(args)
    if args.cmd == "compare":
        from rlhf_trainer import compare
        return compare.main(args)
    from rlhf_trainer.plot import plot_run
    print(plot_run(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
