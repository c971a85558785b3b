"""Run directories: created exclusively, continued only from a checkpoint, and never left
behind by a run that failed before its first checkpoint.

- ``claim_run_dir`` (``prepare_run_dir``: its path alone) is the one function that makes (or
  reopens, with ``--resume``) the run directory of ``train``, ``rm``, ``demo``, ``compare`` and
  ``overopt``; under torchrun only rank 0 calls it and hands the path to the others.
- A new directory is claimed atomically: ``os.mkdir`` and then a marker file, ``.run``, created
  with ``O_EXCL``. Of two runs started at once on one path exactly one gets it: a default name
  (``runs/<prefix>-<time>``) then takes the next free suffix (``-2``, ``-3``, ...), an explicit
  ``--out`` is refused.
- ``RunDirectory`` wraps a run: when it raises (or is interrupted) before the directory holds a
  checkpoint, the directory it created is removed, so the same command can be rerun.
- ``check_resume``: ``--resume`` needs the checkpoint and the same configuration; the only key
  that may change is the one that counts the run's steps, and only upward (extending a run).
"""

import json
import os
import shutil
import socket
import sys
import time

from rlhf_trainer.config import Config, InputError

MARKER = ".run"            # written with O_EXCL into every directory a run claims
# what makes a run resumable: one process's checkpoint.pt, or torchrun's sharded folder
# (dist_checkpoint.FOLDER); a run resumes from either, at any number of processes
CHECKPOINT = ("checkpoint.pt", "checkpoint")
# what a run directory holds, so --overwrite deletes only those
RUN_FILES = (MARKER, "config.yaml", "compare.md")


def _names(checkpoint):
    return (checkpoint,) if isinstance(checkpoint, str) else tuple(checkpoint)


def holds_checkpoint(path, checkpoint=CHECKPOINT):
    return any(os.path.exists(os.path.join(path, n)) for n in _names(checkpoint))


def _no_checkpoint(path, checkpoint):
    first, *others = _names(checkpoint)
    nor = " (nor %s)" % ", ".join(n + "/" for n in others) if others else ""
    return InputError("--resume: %s holds no %s to continue from%s (the run stopped before its first checkpoint, "
                      "or never checkpoints): run it again without --resume" % (path, first, nor))


def _claim(path):
    """Makes path (or takes an existing empty folder) for this process alone. Returns True if this
    call created the folder, False if it was there and empty; raises FileExistsError if the path
    holds anything (another run's files, or its marker: it claimed the path first)."""
    created = False
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        if not os.path.isdir(path) or os.listdir(path):
            raise
    # the marker decides between two processes that both found the folder empty or both made it
    fd = os.open(os.path.join(path, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
                   "created": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    return created


def create_run_dir(out=None, prefix="run", root="runs"):
    """A new run directory for this process alone -> (path, created). ``out`` None: ``root/prefix-<time>``,
    with the first free suffix -2, -3, ... when another run has that name; ``out`` given: that path,
    which must not exist or be an empty folder (InputError otherwise). ``created``: this call made the
    folder (False: it was an empty folder already, or another run racing for the same new path made
    it and lost the marker to this one)."""
    if out is not None:
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        try:
            return out, _claim(out)
        except FileExistsError:
            raise InputError("--out %s already holds a run: --resume continues it, --overwrite replaces it"
                             % out) from None
    os.makedirs(root, exist_ok=True)
    base = os.path.join(root, time.strftime(prefix + "-%Y%m%d-%H%M%S"))
    for n in range(1, 1000):
        path = base if n == 1 else "%s-%d" % (base, n)
        try:
            return path, _claim(path)
        except FileExistsError:
            continue
    raise InputError("runs: %s and its 998 suffixed names are all taken; give --out" % base)


def claim_run_dir(out, resume, overwrite, prefix, checkpoint=None):
    """The run directory of a command -> (path, created): a new one (``create_run_dir``); with
    ``resume``, the existing ``out``, which must hold ``checkpoint`` when one is named; with
    ``overwrite``, ``out`` emptied first when it is a run directory. ``created``: this call made
    the folder (it is then removed if the run fails before its first checkpoint)."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite: give one of them")
    if resume:
        if out is None:
            raise InputError("--resume needs --out RUN_DIR: the run directory to continue")
        if not os.path.isdir(out):
            raise InputError("--resume: no run directory %s" % out)
        if checkpoint is not None and not holds_checkpoint(out, checkpoint):
            raise _no_checkpoint(out, checkpoint)
        return out, False
    if overwrite and out is not None and os.path.isdir(out) and os.listdir(out):
        if not any(os.path.exists(os.path.join(out, f)) for f in RUN_FILES):
            raise InputError("--overwrite: %s is not a run directory (no config.yaml); not deleting it" % out)
        shutil.rmtree(out)
    return create_run_dir(out, prefix)


def prepare_run_dir(out, resume, overwrite, prefix, checkpoint=None):
    """``claim_run_dir``'s path alone."""
    return claim_run_dir(out, resume, overwrite, prefix, checkpoint)[0]


def discard_unstarted(path, created, checkpoint=CHECKPOINT):
    """After a failure: removes what the run wrote unless the directory holds ``checkpoint`` (a
    rerun with --resume continues that). A folder this run created goes; one that was there,
    empty, is emptied again."""
    if checkpoint is not None and holds_checkpoint(path, checkpoint):
        return False
    if created:
        shutil.rmtree(path, ignore_errors=True)
    else:
        for name in os.listdir(path):
            p = os.path.join(path, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    return True


class RunDirectory:
    """``with RunDirectory(out, resume, overwrite, prefix) as run_dir:`` the run directory, and on
    an exception inside, ``discard_unstarted`` of a directory this command created or emptied
    (never of one it resumed). ``checkpoint``: the file that makes a run resumable (None: the run
    never checkpoints, so a failed one always goes). Under torchrun rank 0 alone claims (and
    discards) the directory, and every rank gets its path: one job, one directory."""

    def __init__(self, out, resume, overwrite, prefix, checkpoint=CHECKPOINT):
        from rlhf_trainer import parallel
        self.checkpoint = checkpoint
        self.resume = resume
        self.main = parallel.is_main()
        self.path, self.created = claim_run_dir(out, resume, overwrite, prefix,
                                                  checkpoint=checkpoint if resume else None) if self.main else (None, False)
        self.path = parallel.broadcast(self.path)

    def __enter__(self):
        return self.path

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self.resume and self.main:
            discard_unstarted(self.path, self.created, self.checkpoint)
        return False


# ---------- resuming ----------
def steps_key(cfg):
    """The option counting a run's steps (``<algo>.steps``; ``expert_iteration.rounds``): the one
    option --resume lets grow."""
    return "%s.%s" % (cfg.algo, "rounds" if cfg.algo == "expert_iteration" else "steps")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def config_differences(saved, now):
    """Config dicts -> ["key: saved -> now", ...] for every option that differs (sorted)."""
    a, b = _flat(saved), _flat(now)
    unset = "(not set)"
    return ["%s: %s -> %s" % (k, a.get(k, unset), b.get(k, unset))
            for k in sorted(set(a) | set(b)) if a.get(k, unset) != b.get(k, unset)]


def same_run(saved, now, key):
    """Whether config dicts ``saved`` and ``now`` describe the same run, but for the option ``key``
    (dotted: ``ppo.steps``), which may differ."""
    a, b = _flat(saved), _flat(now)
    a.pop(key, None)
    b.pop(key, None)
    return a == b


def check_resume(run_dir, cfg, checkpoint=CHECKPOINT):
    """What --resume of run_dir with cfg needs, checked before anything is loaded: the checkpoint,
    and run_dir/config.yaml equal to cfg but for the step count (``check_extension`` checks it
    against the checkpoint's step once that is loaded). InputError names every key that differs."""
    if not holds_checkpoint(run_dir, checkpoint):
        raise _no_checkpoint(run_dir, checkpoint)
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(saved_path):
        raise InputError("--resume: %s has a checkpoint but no config.yaml" % run_dir)
    saved, now = Config.load(saved_path).to_dict(), cfg.to_dict()
    key = steps_key(cfg)
    diff = [d for d in config_differences(saved, now) if not d.startswith(key + ":")]
    if diff:
        raise InputError("--resume: %s was run with another configuration (its config.yaml -> this one): %s; "
                         "resume with the run's own configuration (only %s may grow, to extend the run)"
                         % (run_dir, "; ".join(diff), key))


def check_extension(cfg, done, run_dir):
    """After a checkpoint of ``done`` steps is loaded: the configured step count must not be below it."""
    key = steps_key(cfg)
    steps = _flat(cfg.to_dict())[key]
    if steps < done:
        raise InputError("--resume: %s = %d, but %s has done %d steps: a run can be extended, not shortened"
                         % (key, steps, run_dir, done))
