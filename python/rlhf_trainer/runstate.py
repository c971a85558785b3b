"""A run's state on disk and in the RNGs: seeding, the random state a checkpoint keeps for an
exact resume, atomic checkpoint writes, and the JSONL log rewritten to a checkpoint's steps."""

import json
import os
import random

import numpy as np
import torch


def seed_rngs(seed):
    """Seeds a run's random state: the global torch, Python and NumPy RNGs (generate() samples
    from torch's) and -> the run's own generator (prompts and minibatch order)."""
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 2)
    random.seed(seed)
    np.random.seed(seed)
    return gen


def rng_state(gen, device):
    """The random state a checkpoint keeps for an exact resume (the device's RNG on CUDA too)."""
    s = {"gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
         "numpy_rng": np.random.get_state()}
    if device.type == "cuda":   # generate() samples from the device's RNG
        s["cuda_rng"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(gen, s, device):
    """Restores what rng_state kept."""
    gen.set_state(s["gen"])
    torch.set_rng_state(s["torch_rng"])
    if "cuda_rng" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda_rng"], device)
    random.setstate(s["python_rng"])
    np.random.set_state(s["numpy_rng"])


def save_checkpoint(state, path):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)   # never leave a half-written checkpoint


def rewrite_log(run_dir, history):
    """The log holds exactly the checkpoint's steps, so a resumed run appends cleanly."""
    if run_dir:
        with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
