"""``python -m rlhf_kernels.info``: versions, what was built, what is usable here."""

import importlib.metadata
import platform
import sys

import torch

import rlhf_kernels
from rlhf_kernels import _backend, _ext


def _triton_version():
    if not _backend.triton_installed():
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def report():
    """The facts as a dict (also used to stamp benchmark results)."""
    build = _ext.build_info()
    cuda_dev = torch.cuda.is_available()
    built = []
    if build.get("loaded"):
        built.append("cpu")
        if build.get("binary_cuda"):
            built.append("cuda")
    usable = {"cpu": _backend.available("cpu")}
    if cuda_dev:
        usable["cuda"] = _backend.available("cuda")
    why = {b: _backend.why_not(b, "cuda" if b in ("cuda", "triton") else "cpu") for b in _backend.BACKENDS}
    if not cuda_dev:  # no GPU: the CPU tensors' reasons; triton's only when it is missing altogether
        why = {b: r for b, r in why.items() if b not in ("cuda", "triton")}
        if not _backend.triton_installed():
            why["triton"] = ("triton is not installed (a CPU-only torch brings none): `pip install triton` runs "
                             "its kernels on CPU tensors under TRITON_INTERPRET=1")
    return {
        "rlhf_kernels": rlhf_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "gpu": torch.cuda.get_device_name(0) if cuda_dev else None,
        "extension_loaded": bool(build.get("loaded")),
        "extension_error": build.get("load_error"),
        "built_for_torch": build.get("binary_torch") or build.get("torch"),
        "built_backends": built,
        "cuda_archs": build.get("cuda_archs", []) if "cuda" in built else [],
        "cuda_runtime": build.get("binary_cuda_runtime"),
        "cuda_reason": build.get("cuda_reason"),
        "usable": usable,
        "why_not": {b: r for b, r in why.items() if r},
    }


def main():
    r = report()
    lines = [
        "rlhf-kernels %s" % r["rlhf_kernels"],
        "  python        %s" % r["python"],
        "  torch         %s (CUDA %s)" % (r["torch"], r["torch_cuda"] or "none"),
        "  triton        %s" % (r["triton"] or "not installed"),
        "  GPU           %s" % (r["gpu"] or "none visible"),
        "extension rlhf_kernels._C: %s" % ("loaded" if r["extension_loaded"] else r["extension_error"]),
    ]
    if r["extension_loaded"]:
        lines.append("  built for torch %s" % r["built_for_torch"])
        lines.append("  compiled backends: %s" % ", ".join(r["built_backends"]))
        if "cuda" in r["built_backends"]:
            lines.append("  CUDA kernels: runtime %s, archs %s" % (r["cuda_runtime"], ";".join(r["cuda_archs"])))
        else:
            lines.append("  CUDA kernels: not built (%s)" % (r["cuda_reason"] or "unknown"))
    lines.append("usable backends:")
    for dev, names in r["usable"].items():
        lines.append("  %s tensors: %s" % (dev, ", ".join(names)))
    if "cuda" not in r["usable"]:
        lines.append("  cuda tensors: no GPU visible")
    for b, reason in r["why_not"].items():
        lines.append("  not %s: %s" % (b, reason))
    built = r["built_for_torch"]
    if built and _ext._minor(built) != _ext._minor(r["torch"]):
        lines.append("WARNING: the extension was built against torch %s but torch %s is running: rebuild it"
                     % (built, r["torch"]))
    lines.append("check every op here against its float64 reference: python -m rlhf_kernels.selftest")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
