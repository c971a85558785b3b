"""The statistics a loss op returns: a read-only mapping of names to 0-d float32 tensors.

The kernels write all of a loss's statistics into one float32 vector; ``Stats`` maps their
names (rlhf_kernels/_layout.py) to 0-d views of it, made on first access. So a call that
never reads its statistics pays nothing for them (making eight views costs more host time
than some of the kernels), and ``stats.packed`` hands all of them over as one tensor: one
all-reduce across ranks, or one ``.tolist()`` (one device sync) to log them.
"""

from collections.abc import Mapping

import torch


class Stats(Mapping):
    """``{name: 0-d float32 tensor}`` over one packed vector, in the order of ``names``."""

    __slots__ = ("names", "packed", "_views")

    def __init__(self, names, packed):
        self.names = names     # tuple of str
        self.packed = packed   # [len(names)] float32 tensor, on the inputs' device
        self._views = None

    def _all(self):
        if self._views is None:
            self._views = dict(zip(self.names, self.packed.unbind(0)))
        return self._views

    def __getitem__(self, name):
        return self._all()[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __contains__(self, name):
        return name in self.names

    def copy(self):
        """A plain dict of the views."""
        return dict(self._all())

    def __repr__(self):
        return "Stats(%s)" % ", ".join("%s=%s" % (k, v) for k, v in zip(self.names, self.packed.tolist()))


def stats(names, packed):
    """The statistics of one call: ``Stats`` in eager mode; a plain dict of views while
    torch.compile traces (what it compiles best; the lazy views gain nothing there)."""
    if torch.compiler.is_compiling():
        return dict(zip(names, packed.unbind(0)))
    return Stats(names, packed)
