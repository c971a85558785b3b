"""Loads the native extension ``rlhf_kernels._C`` and its build facts, once, at import.

A missing extension is normal (``RLHF_KERNELS_NO_EXT=1`` installs); an extension that
fails to load degrades to a warning, never a crash. A binary built for another torch version
(a wheel installed beside another torch, say) is not even loaded: its C++ ABI would not match.
The warning says so, and the triton and torch backends serve every call.
The facts are plain Python values read here once: no op ever calls into pybind11 to ask
(that would cost time on every call and stop torch.compile from tracing the op).
"""

import json
import os
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))

C = None            # the module, when loaded
LOAD_ERROR = None   # why it is not, as a sentence
BUILD = {}          # what setup.py recorded (rlhf_kernels/_build_info.json)
BINARY = {}         # what the loaded binary says of itself (_C.build_info())
CUDA_BUILT = False  # the loaded binary holds CUDA kernels

try:
    with open(os.path.join(_HERE, "_build_info.json")) as _f:
        BUILD = json.load(_f)
except (OSError, ValueError):
    BUILD = {}


def _minor(version):
    """'2.14.1+cu130' -> '2.14': a build serves the torch minor version it was built against
    (what its wheel requires)."""
    return ".".join(str(version).split("+")[0].split(".")[:2])


def _load():
    global C, LOAD_ERROR, BINARY, CUDA_BUILT
    if BUILD.get("extension") is False:
        LOAD_ERROR = "not built (%s)" % BUILD.get("reason", "pure-Python install")
        return
    built = BUILD.get("torch")
    if built and _minor(built) != _minor(torch.__version__):
        LOAD_ERROR = "built against torch %s, but torch %s is running" % (built, torch.__version__)
        warnings.warn("rlhf_kernels: the native extension was %s; it is not loaded. Install the rlhf-kernels "
                      "build for this torch, or rebuild it (pip install --no-build-isolation -e .). Only the "
                      "torch and triton backends are usable." % LOAD_ERROR, RuntimeWarning, stacklevel=3)
        return
    try:
        from rlhf_kernels import _C as module  # registers torch.ops.rlhf_kernels.*
    except ImportError as e:
        LOAD_ERROR = "failed to load: %s" % e
        if BUILD:
            warnings.warn("rlhf_kernels: the native extension %s. Only the torch and triton backends are usable."
                          % LOAD_ERROR, RuntimeWarning, stacklevel=3)
        return
    C = module
    BINARY = dict(module.build_info())
    CUDA_BUILT = bool(BINARY["cuda"])
    if _minor(BINARY["torch"]) != _minor(torch.__version__):
        warnings.warn("rlhf_kernels: the native extension was built against torch %s but torch %s is running; "
                      "rebuild it (pip install --no-build-isolation -e .)" % (BINARY["torch"], torch.__version__),
                      RuntimeWarning, stacklevel=3)


_load()


def loaded():
    return C is not None


def cuda_built():
    """Whether the loaded binary holds CUDA kernels."""
    return CUDA_BUILT


def build_info():
    """Facts about the native build, merged from the binary and setup.py's record."""
    info = dict(BUILD)
    info["loaded"] = C is not None
    info["load_error"] = LOAD_ERROR
    info.update({"binary_" + k: v for k, v in BINARY.items()})
    return info
