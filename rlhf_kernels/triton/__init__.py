"""Triton kernels. Imported lazily by the public API, never at ``import rlhf_kernels``."""
