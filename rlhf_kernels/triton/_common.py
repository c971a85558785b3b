"""Launch settings shared by the Triton kernels.

Under the interpreter (TRITON_INTERPRET=1, how the tests run Triton on a CPU) every program
runs in numpy, element by element for scans: small blocks keep the tests quick and still
exercise the carries and merges between blocks. The variable is read once, here (Triton
itself reads it when it is imported), never per call.
"""

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block(n, gpu_cap, interpreter_cap, floor=1):
    """A power-of-two block for `n` elements: at least `floor`, at most the cap for where we run."""
    cap = interpreter_cap if INTERPRET else gpu_cap
    return max(floor, min(cap, triton.next_power_of_2(max(n, 1))))


def warps(block_size):
    """Warps for a row-reduction program over `block_size` elements per step."""
    return 8 if block_size >= 2048 else 4
