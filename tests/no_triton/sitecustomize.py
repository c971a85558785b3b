"""Hide an installed triton, as on a machine whose CPU-only torch brought none.

Put this folder first on PYTHONPATH (``PYTHONPATH=tests/no_triton``): Python imports this
module at start-up, in every process started with that environment (pytest's subprocesses
too), and from then on ``importlib.util.find_spec("triton")`` answers None and
``import triton`` raises ModuleNotFoundError, exactly as when triton is not installed.
"""

import sys
from importlib.machinery import PathFinder


class _PathFinderWithoutTriton(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "triton" or fullname.startswith("triton."):
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_PathFinderWithoutTriton if f is PathFinder else f for f in sys.meta_path]
