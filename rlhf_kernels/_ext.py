"""Loads the native extension ``rlhf_kernels._C`` and its build facts, once, at import.

A missing extension is normal (``RLHF_KERNELS_NO_EXT=1`` installs); an extension that
fails to load (built for another torch, say) degrades to a warning, never a crash.
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


def _base(version):
    return str(version).split("+")[0]


def _load():
    global C, LOAD_ERROR, BINARY, CUDA_BUILT
    if BUILD.get("extension") is False:
        LOAD_ERROR = "not built (%s)" % BUILD.get("reason", "pure-Python install")
        return
    try:
        from rlhf_kernels import _C as module  # registers torch.ops.rlhf_kernels.*
    except ImportError as e:
        LOAD_ERROR = "failed to load: %s" % e
        built = BUILD.get("torch")
        hint = ""
        if built and _base(built) != _base(torch.__version__):
            hint = " It was built against torch %s but torch %s is running: rebuild it." % (built, torch.__version__)
        if BUILD:
            warnings.warn("rlhf_kernels: the native extension %s.%s Only the torch and triton backends are usable."
                          % (LOAD_ERROR, hint), RuntimeWarning, stacklevel=3)
        return
    C = module
    BINARY = dict(module.build_info())
    CUDA_BUILT = bool(BINARY["cuda"])
    if _base(BINARY["torch"]) != _base(torch.__version__):
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
