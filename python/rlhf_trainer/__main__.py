"""python -m rlhf_trainer <command> [options]   (python -m rlhf_trainer <command> --help for its options)"""

import argparse
import importlib.util
import sys

# one line each in --help, in this order
COMMANDS = [
    ("train", "train a policy on your models, prompts and reward (ppo, grpo, rloo, reinforce_pp): --config cfg.yaml"),
    ("rm", "train a reward model from preference pairs or rankings (JSONL): --config cfg.yaml"),
    ("demo", "reward model + the configured algorithm on the toy task, against the exact optimum"),
    ("compare", "every algorithm on the toy task against one reward model: a table and figures"),
    ("overopt", "reward over-optimization on the toy task, exactly: true and proxy reward against KL(pi || pi_ref)"),
    ("plot", "redraw RUN_DIR/curves.png from RUN_DIR/log.jsonl"),
    ("bench", "time whole PPO steps with the kernels on vs off: phases, tokens/s, peak memory, largest micro-batch"),
]
# the trainer's dependencies, the extra `rlhf-kernels[trainer]` (module name -> package)
TRAINER_DEPS = {"transformers": "transformers", "tqdm": "tqdm", "yaml": "pyyaml", "matplotlib": "matplotlib",
                "pydantic": "pydantic"}


def _parser():
    lines = "\n".join("  %-9s %s" % c for c in COMMANDS)
    p = argparse.ArgumentParser(prog="python -m rlhf_trainer", usage="%(prog)s <command> [options]",
                                description="commands:\n" + lines,
                                epilog="python -m rlhf_trainer <command> --help: that command's options",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the commands are listed in the description, one line each (argparse would rewrap their help)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="<command>", help=argparse.SUPPRESS)
    helps = dict(COMMANDS)

    def add(name):
        return sub.add_parser(name, prog="python -m rlhf_trainer " + name, description=helps[name])

    t = add("train")
    t.add_argument("--config", required=True, help="the run's YAML config (README: Train your own model)")
    t.add_argument("--out", help="run directory (default runs/train-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run directory's checkpoint exactly (the same "
                   "config; a larger <algo>.steps extends a finished run: docs/runs.md)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = add("rm")
    r.add_argument("--config", required=True, help="a YAML config with an rm section")
    r.add_argument("--out", help="run directory (default runs/rm-<time>); the model goes to OUT/model")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = add("demo")
    d.add_argument("--config", help="a YAML config (default: the built-in demo config)")
    d.add_argument("--out", help="run directory (default runs/demo-<time>)")
    d.add_argument("--small", action="store_true", help="the smaller CI configuration")
    d.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint (the same "
                   "config; a larger <algo>.steps extends a finished run: docs/runs.md)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = add("compare")
    c.add_argument("--out", help="output directory (default runs/compare-<time>)")
    c.add_argument("--small", action="store_true", help="the smaller CI configuration of every algorithm")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--algos", help="comma-separated subset (default: all, in the table's order)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--beta", type=float, help="the KL coefficient of J for every algorithm (default: the config's)")
    c.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the models are tiny; 0 keeps torch's default)")
    o = add("overopt")
    o.add_argument("--out", help="output directory (default runs/overopt-<time>)")
    o.add_argument("--small", action="store_true", help="the tiny CI configuration")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the models are tiny; 0 keeps torch's default)")
    pl = add("plot")
    pl.add_argument("run_dir")
    from rlhf_trainer.bench import add_arguments as add_bench_arguments   # os and sys only
    add_bench_arguments(add("bench"))
    return p


def missing_deps():
    return [pkg for mod, pkg in TRAINER_DEPS.items() if importlib.util.find_spec(mod) is None]


def main(argv=None):
    args = _parser().parse_args(argv)
    missing = missing_deps()
    if missing:
        print("rlhf_trainer needs the trainer's dependencies (missing: %s): pip install 'rlhf-kernels[trainer]'"
              % ", ".join(missing), file=sys.stderr)
        return 1
    from rlhf_trainer import parallel
    from rlhf_trainer.config import ConfigError, InputError, RewardFunctionError
    parallel.start()   # under torchrun: the process group, before anything can fail on one rank only
    try:
        if args.cmd == "plot":
            from rlhf_trainer.plot import plot_run
            print(plot_run(args.run_dir))
            return 0
        module = importlib.import_module("rlhf_trainer." + args.cmd)
        code = module.main(args)
        parallel.finish()
        return code
    except ConfigError as e:
        if parallel.abort("config error: %s" % e):
            print("config error: %s" % e, file=sys.stderr)
        return 2
    except InputError as e:
        if parallel.abort("error: %s" % e):
            print("error: %s" % e, file=sys.stderr)
            if isinstance(e, RewardFunctionError) and e.__cause__ is not None:
                _print_cause(e.__cause__)
        return 2
    except BaseException as e:   # the traceback below; under torchrun every other rank stops too
        parallel.abort("%s: %s" % (type(e).__name__, e))
        raise


def _print_cause(cause):
    """The traceback of what a user's reward function raised, from the user's frame on."""
    import traceback
    tb = cause.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("rlhf_trainer."):
        tb = tb.tb_next   # our frame that called it
    print("\nthe function's traceback:", file=sys.stderr)
    traceback.print_exception(type(cause), cause, tb, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
