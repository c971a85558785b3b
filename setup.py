"""Build of rlhf-kernels: one native extension, ``rlhf_kernels._C``.

Switches (environment variables):
  RLHF_KERNELS_NO_EXT=1     pure-Python install: only the ``torch`` (and ``triton``) backends
  RLHF_KERNELS_CUDA=0|1     force the CUDA kernels off / on (default: on when torch has CUDA
                            and nvcc is found; never decided by torch.cuda.is_available())
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0+PTX")
  MAX_JOBS                  parallel compile jobs (default: CPU count)
  CUDA_HOME                 CUDA toolkit root (default: found from nvcc's real location)

Install with ``pip install --no-build-isolation -e .`` after torch is installed: this file
imports torch, and build isolation would compile against a different torch (so torch is not
a build requirement: an isolated build stops at once, saying so). A build with the extension
is versioned for the torch it was compiled against (``0.1.0+torch2.14cu130``) and requires
that torch minor version; a pure-Python build (RLHF_KERNELS_NO_EXT=1) takes any torch >= 2.4.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0+PTX"
BUILD_INFO = os.path.join(ROOT, "rlhf_kernels", "_build_info.json")


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _cuda_home_from_nvcc():
    """The toolkit root of the nvcc on PATH, following links and wrapper scripts.

    nvcc may be a symlink or a small shell wrapper outside the toolkit (as on machines
    where /usr/local/bin/nvcc execs the real one), so ``dirname(which nvcc)`` can be wrong.
    ``nvcc -dryrun`` prints the toolkit's own TOP directory, which is authoritative.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            top = os.path.realpath(m.group(1).strip())  # TOP is the toolkit root (bin/..)
            if os.path.exists(os.path.join(top, "bin", "nvcc")):
                return top
    except (OSError, subprocess.SubprocessError):
        pass
    real = os.path.realpath(nvcc)
    return os.path.dirname(os.path.dirname(real))


def _torch():
    """The installed torch, which the extension is compiled against; stop at once when the
    build cannot see it (an isolated build environment: pip's default without
    --no-build-isolation), rather than compile against another torch."""
    how = ("install torch first, then build against it with `pip install --no-build-isolation .` "
           "(or `-e .`, or `python -m build --wheel --no-isolation`); `make install` does both")
    try:
        import torch
    except ImportError:
        sys.exit("setup.py: torch is not importable here: " + how)
    if "pip-build-env" in (torch.__file__ or ""):
        sys.exit("setup.py: this is an isolated build environment with its own torch (%s), not the one you will "
                 "run: %s" % (torch.__version__, how))
    return torch


def _decide_cuda():
    """(build_cuda, cuda_home, reason)."""
    torch = _torch()

    want = _flag("RLHF_KERNELS_CUDA")
    if want is False:
        return False, None, "RLHF_KERNELS_CUDA=0"
    if torch.version.cuda is None:
        if want:
            sys.exit("setup.py: RLHF_KERNELS_CUDA=1 but this torch has no CUDA (torch.version.cuda is None)")
        return False, None, "torch was built without CUDA"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _cuda_home_from_nvcc()
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        if want:
            sys.exit("setup.py: RLHF_KERNELS_CUDA=1 but no nvcc was found (set CUDA_HOME or put nvcc on PATH)")
        return False, None, "nvcc not found"
    return True, home, f"nvcc in {home}"


def _nvidia_wheel_dirs():
    """Headers and libraries of the nvidia-* wheels that a CUDA build of torch depends on
    (cuBLAS, cuSPARSE, ... live there, not always in the toolkit)."""
    import site

    incs, libs = [], []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("cu13", "cu12"):
            base = os.path.join(sp, "nvidia", sub)
            if os.path.isdir(os.path.join(base, "include")):
                incs.append(os.path.join(base, "include"))
            if os.path.isdir(os.path.join(base, "lib")):
                libs.append(os.path.join(base, "lib"))
        for pkg in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include"))):
            if pkg not in incs:
                incs.append(pkg)
    return incs, libs


def _extensions():
    """(ext_modules, cmdclass, version, torch requirement)."""
    if _flag("RLHF_KERNELS_NO_EXT"):
        _write_build_info({"extension": False, "reason": "RLHF_KERNELS_NO_EXT=1"})
        return [], {}, VERSION, "torch>=2.4"

    build_cuda, cuda_home, reason = _decide_cuda()
    if build_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import time.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/autograd/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-DRLHF_WITH_CUDA=%d" % int(build_cuda)]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    library_dirs = []
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-DRLHF_WITH_CUDA=1",
                "--threads=%d" % max(1, min(4, os.cpu_count() or 1))]
        incs, libs = _nvidia_wheel_dirs()
        include_dirs += [os.path.join(cuda_home, "include")] + incs
        library_dirs += [os.path.join(cuda_home, "lib64")] + libs
        ext_cls = cpp_extension.CUDAExtension
        args = {"cxx": cxx, "nvcc": nvcc}
    else:
        ext_cls = cpp_extension.CppExtension
        args = {"cxx": cxx}

    ext = ext_cls(
        name="rlhf_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args=args,
    )
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build_cuda else ""
    info = {
        "extension": True,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": build_cuda,
        "cuda_reason": reason,
        "cuda_home": cuda_home,
        "cuda_archs": [a for a in re.split(r"[;\s]+", archs) if a],
    }

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Writes the build facts next to the extension it built (the source tree for an editable
        or --inplace build, the build folder for a wheel), so that a wheel built from a checkout
        never rewrites the facts of the checkout's own extension. A wheel's extension is linked
        with ``-s`` (no symbol table, no DWARF debug sections, which are most of an unstripped
        build's size); an editable or --inplace build keeps them for debuggers and profilers."""

        def build_extensions(self):
            if self._strip:
                for e in self.extensions:
                    e.extra_link_args = list(e.extra_link_args or []) + ["-s"]
            super().build_extensions()

        def finalize_options(self):
            super().finalize_options()
            # One persistent object folder for every build of this checkout (editable, --inplace,
            # wheel), instead of a fresh temporary one per editable install: ninja recompiles
            # only what changed, and a wheel built with the same flags after an editable install
            # reuses its objects (then only links).
            self.build_temp = os.environ.get("RLHF_KERNELS_BUILD_TEMP") or os.path.join(ROOT, "build", "ext")

        def run(self):
            # decided here: setuptools' run() clears `inplace` while it builds, then copies
            self._strip = not self.inplace and not getattr(self, "editable_mode", False)
            super().run()
            _write_build_info(info, os.path.dirname(self.get_ext_fullpath(ext.name)))

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    flavour = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    return ([ext], {"build_ext": BuildExt},
            "%s+torch%s.%s%s" % (VERSION, major, minor, flavour), "torch==%s.%s.*" % (major, minor))


def _write_build_info(info, folder=os.path.dirname(BUILD_INFO)):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, os.path.basename(BUILD_INFO)), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)


ext_modules, cmdclass, version, torch_requirement = _extensions()

setup(
    version=version,
    install_requires=[torch_requirement, "numpy"],
    packages=find_packages(include=["rlhf_kernels", "rlhf_kernels.*"]) + ["rlhf_trainer"],
    package_dir={"rlhf_trainer": "python/rlhf_trainer"},
    package_data={"rlhf_kernels": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
