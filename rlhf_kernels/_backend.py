"""Backend selection: the only place that decides which kernels serve a call.

``auto``: a CUDA tensor goes to ``cuda`` if built, else ``triton``, else ``torch``;
a CPU tensor goes to ``cpu`` if built, else ``torch``. ``RLHF_KERNELS_BACKEND`` set
to a backend name replaces ``auto``. An explicit backend that cannot serve the call
raises ``BackendUnavailable`` saying why.

Every op call asks ``pick``, so it is a dictionary lookup once a (backend, device type)
pair has been seen: the environment (``RLHF_KERNELS_BACKEND``, ``TRITON_INTERPRET``) is
read once, at import (``refresh()`` reads it again), and the build facts come from
``_ext`` (read once at import too).
"""

import importlib.util
import os

import torch

from rlhf_kernels import _ext

BACKENDS = ("cuda", "triton", "cpu", "torch")
NATIVE = frozenset(("cpu", "cuda"))
ENV_VAR = "RLHF_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


_env_backend = "auto"   # RLHF_KERNELS_BACKEND, read by refresh()
_interpret = False      # TRITON_INTERPRET=1, read by refresh()
_triton = None          # triton importable (found lazily: the lookup costs a file-system walk)
_picked = {}            # (backend, tensor on CUDA) -> backend name, for CPU and CUDA tensors


def refresh():
    """Read ``RLHF_KERNELS_BACKEND`` and ``TRITON_INTERPRET`` again and forget earlier choices."""
    global _env_backend, _interpret
    _env_backend = os.environ.get(ENV_VAR, "auto") or "auto"
    _interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    _picked.clear()


refresh()


def triton_installed():
    global _triton
    if _triton is None:
        _triton = importlib.util.find_spec("triton") is not None
    return _triton


def triton_interpret():
    return _interpret


def _gpu_visible():
    return torch.cuda.is_available()


def why_not(backend, device):
    """None if ``backend`` can run on tensors on ``device`` on this machine, else the reason."""
    dev = torch.device(device)
    if backend == "torch":
        return None
    if backend == "cpu":
        if not _ext.loaded():
            return "the native extension is %s" % _ext.LOAD_ERROR
        if dev.type != "cpu":
            return "the cpu backend takes CPU tensors, got tensors on %s" % dev
        return None
    if backend == "cuda":
        if not _ext.loaded():
            return "the native extension is %s" % _ext.LOAD_ERROR
        if not _ext.cuda_built():
            return "the extension was built without CUDA kernels (%s)" % _ext.BUILD.get("cuda_reason", "no nvcc")
        if dev.type != "cuda":
            return "the cuda backend takes CUDA tensors, got tensors on %s" % dev
        if not _gpu_visible():
            return "no GPU is visible"
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if dev.type == "cuda":
            return None if _gpu_visible() else "no GPU is visible"
        if dev.type == "cpu" and _interpret:
            return None
        return "the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got %s" % dev
    return "unknown backend %r: choose one of %s or 'auto'" % (backend, ", ".join(BACKENDS))


def resolve(backend, device, op=""):
    """The backend name that will run ``op`` on tensors on ``device`` (the slow path of ``pick``)."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str):
        raise TypeError("%s: `backend` must be a string, got %r" % (op, backend))
    if backend == "auto":
        backend = _env_backend
    if backend == "auto":
        dev = torch.device(device)
        order = ("cuda", "triton", "torch") if dev.type == "cuda" else ("cpu", "torch")
        for name in order:
            if why_not(name, dev) is None:
                return name
        return "torch"
    reason = why_not(backend, device)
    if reason is not None:
        raise BackendUnavailable("%s: backend %r cannot serve this call: %s" % (op, backend, reason))
    return backend


def pick(backend, tensor, op, arg="input"):
    """``resolve`` for the device of ``tensor`` (the argument named ``arg``), cached per
    (backend, CPU or CUDA)."""
    try:
        cuda = tensor.is_cuda
    except AttributeError:
        raise TypeError("%s: `%s` must be a torch.Tensor, got %s" % (op, arg, type(tensor).__name__)) from None
    name = _picked.get((backend, cuda))
    if name is not None and (cuda or tensor.is_cpu):
        return name
    name = resolve(backend, tensor.device, op)
    if cuda or tensor.is_cpu:
        _picked[(backend, cuda)] = name
    return name


def pick_kernel(op, backend, tensor, arg, dtypes):
    """``pick`` for an op whose kernels serve ``tensor`` (the argument named ``arg``) only in
    ``dtypes``. ``auto`` (and the environment variable's ``auto``) falls back to ``torch``
    when the kernels cannot serve the call; an explicit kernel backend raises
    ``BackendUnavailable`` saying why."""
    name = pick(backend, tensor, op, arg)
    if name == "torch" or tensor.dtype in dtypes:
        return name
    if backend in (None, "auto") and _env_backend == "auto":
        return "torch"
    raise BackendUnavailable("%s: backend %r cannot serve this call: %s must be %s for the kernels, got %s" % (
        op, name, arg, ", ".join(str(d).replace("torch.", "") for d in dtypes), tensor.dtype))


def available(device="cpu"):
    """Backends usable on this machine for tensors on ``device``."""
    return [b for b in BACKENDS if why_not(b, device) is None]
