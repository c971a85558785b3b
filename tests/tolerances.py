"""The tolerances live in rlhf_kernels/tolerances.py (the self-test reads them too); this name
only re-exports them, for tests that still ``import tolerances``."""

from rlhf_kernels.tolerances import *  # noqa: F401,F403
