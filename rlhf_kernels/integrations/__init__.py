"""Drop-in replacements for the hot functions of TRL, verl, OpenRLHF and megatron-core, with ``patch()``.

    import rlhf_kernels.integrations.trl as rk_trl        # also .verl, .openrlhf, .megatron
    with rk_trl.patch():
        trainer.train()

Each module holds replacements with the exact signature, semantics and return convention of
the library's function, implemented with rlhf_kernels' public ops, and ``patch()`` /
``unpatch()`` to swap them in where the library looks them up. Importing these modules does
not import the library; ``patch()`` does (and raises ImportError naming
``pip install 'rlhf-kernels[integrations-<library>]'`` when it is missing). A call with an option a
replacement does not implement runs the library's own function, with a one-time
``FallThroughWarning``. See each module's docstring for its table and docs/integrations.md.
"""

from rlhf_kernels.integrations._common import FallThroughWarning, UnsupportedVersion, extra

LIBRARIES = ("trl", "verl", "openrlhf", "megatron")

__all__ = ["LIBRARIES", "extra", "FallThroughWarning", "UnsupportedVersion"]
