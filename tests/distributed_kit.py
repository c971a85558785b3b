"""Running code under torchrun from the tests: gloo on the CPU, one thread per process."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1",
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"), e.get("PYTHONPATH", "")]))
    return e


def torchrun(args, nproc=2, nnodes=None, node_rank=None, port=None, cwd=None, timeout=300, wait=True):
    """``torchrun --nproc_per_node=nproc [...] args``; returns the CompletedProcess (or the Popen
    when not ``wait``). args: a script path and its arguments, or ["-m", module, ...]."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=%d" % nproc,
           "--master_addr=127.0.0.1", "--master_port=%d" % (port or free_port())]
    if nnodes is not None:
        cmd += ["--nnodes=%d" % nnodes, "--node_rank=%d" % node_rank]
    cmd += list(args)
    if not wait:
        return subprocess.Popen(cmd, env=env(), cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, env=env(), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def python(args, cwd=None, timeout=300):
    """The same command in one plain process (no torchrun)."""
    return subprocess.run([sys.executable] + list(args), env=env(), cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout)
