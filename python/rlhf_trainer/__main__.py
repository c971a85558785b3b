"""python -m rlhf_trainer demo [--small] [--out DIR] [--config cfg.yaml] [--resume]
python -m rlhf_trainer plot RUN_DIR"""

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rlhf_trainer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="reward model + PPO on the toy task, against the exact optimum")
    d.add_argument("--config", help="a YAML config (default: the built-in demo config)")
    d.add_argument("--out", help="run directory (default runs/demo-<time>)")
    d.add_argument("--small", action="store_true", help="the smaller CI configuration")
    d.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl = sub.add_parser("plot", help="write RUN_DIR/curves.png from RUN_DIR/log.jsonl")
    pl.add_argument("run_dir")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        from rlhf_trainer import demo
        return demo.main(args)
    from rlhf_trainer.plot import plot_run
    print(plot_run(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
