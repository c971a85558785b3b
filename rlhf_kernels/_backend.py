"""Backend selection: the only place that decides which kernels serve a call.

``auto``: a CUDA tensor goes to ``cuda`` if built, else ``triton``, else ``torch``;
a CPU tensor goes to ``cpu`` if built, else ``torch``. ``RLHF_KERNELS_BACKEND`` set
to a backend name replaces ``auto``. An explicit backend that cannot serve the call
raises ``BackendUnavailable`` saying why.
"""

import importlib.util
import os

import torch

from rlhf_kernels import _ext

BACKENDS = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "RLHF_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


def triton_installed():
    return importlib.util.find_spec("triton") is not None


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend, device):
    """None if ``backend`` can run on tensors on ``device``, else the reason."""
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
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if dev.type == "cuda":
            return None
        if dev.type == "cpu" and triton_interpret():
            return None
        return "the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got %s" % dev
    return "unknown backend %r: choose one of %s or 'auto'" % (backend, ", ".join(BACKENDS))


def resolve(backend, device, op=""):
    """The backend name that will run ``op`` on tensors on ``device``."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str):
        raise TypeError("%s: backend must be a string, got %r" % (op, backend))
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
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


def resolve_kernel(op, backend, tensor, arg, native_op, dtypes):
    """``resolve`` for an op whose kernels serve ``tensor`` (the argument named ``arg``) only in
    ``dtypes``, and whose native kernels are ``torch.ops.rlhf_kernels.<native_op>``. ``auto``
    (and the environment variable's ``auto``) falls back to ``torch`` when the kernels cannot
    serve the call; an explicit kernel backend raises ``BackendUnavailable`` saying why."""
    name = resolve(backend, tensor.device, op)
    explicit = backend not in (None, "auto") or os.environ.get(ENV_VAR, "auto") not in ("", "auto")
    reason = None
    if name != "torch" and tensor.dtype not in dtypes:
        reason = "%s must be %s for the kernels, got %s" % (
            arg, ", ".join(str(d).replace("torch.", "") for d in dtypes), tensor.dtype)
    elif name in ("cpu", "cuda") and not (_ext.loaded() and hasattr(torch.ops.rlhf_kernels, native_op)):
        reason = "the loaded native extension has no %s op (rebuild it)" % native_op
    if reason is None:
        return name
    if explicit:
        raise BackendUnavailable("%s: backend %r cannot serve this call: %s" % (op, name, reason))
    return "torch"


def available(device="cpu"):
    """Backends usable now for tensors on ``device``."""
    return [b for b in BACKENDS if why_not(b, device) is None]
