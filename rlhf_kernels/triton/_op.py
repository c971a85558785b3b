"""How a Triton op is wired: registered with torch.library, called directly in eager mode.

Every Triton forward and backward is the Triton twin of a native op ``<name>`` and is registered
as a ``torch.library.custom_op`` ``torch.ops.rlhf_kernels.triton_<name>``, each differentiable
forward with ``register_autograd(backward, setup_context=...)``; so torch.compile sees the
Triton ops as it sees the native ones, and compiles with ``fullgraph=True``. Its schema and
fake kernel are derived from the native op's (rlhf_kernels/_signatures.py), never written here:
a Triton op names only the native arguments it does not take (``drop``) and the optional ones
it takes resolved (``required``).

Called eagerly, a custom op goes Python -> dispatcher -> Python, which costs several
microseconds per call (measured on the CPU: about 10 us for a differentiable custom op
against 3 us for a torch.autograd.Function), more than some of the kernels take. So in
eager mode an ``Op`` calls its Python function directly, and a ``DifferentiableOp`` calls
an autograd.Function built from the *same* ``setup_context`` and ``backward``: one
wiring per op, two entry points, chosen by ``torch.compiler.is_compiling()``. The
backward functions call other ``Op`` instances, so the backward is traced as ops too.

Both entry points run ``fn`` under ``on_device``: Triton launches on the *current* CUDA
device, so tensors on cuda:1 while device 0 is current would be launched on device 0 with
device-1 pointers (an illegal address, or slow peer access). The native ops take a
CUDAGuard; this is the Triton ops' one guard, set from the first argument (a tensor in
every op's schema, checked when the op is made).
"""

import torch

from rlhf_kernels import _signatures


def on_device(fn, args):
    """``fn(*args)`` on the CUDA device of ``args[0]`` (every op's first argument is a tensor):
    made current for the call when it is not; nothing more than a test of ``is_cuda`` for CPU
    tensors, and no context manager when the device is already current."""
    t = args[0]
    if t.is_cuda:
        index = t.get_device()
        if index != torch.cuda.current_device():
            with torch.cuda.device(index):
                return fn(*args)
    return fn(*args)


class Op:
    """A Triton op without autograd: ``fn`` registered as ``rlhf_kernels::triton_<name>`` with the
    schema of the native op ``name`` less ``drop``, with ``required`` not optional
    (``_signatures.triton_schema``), and that op's output shapes as its fake kernel; both entry
    points run it on its tensors' device (``on_device``, looked up per call)."""

    def __init__(self, name, fn, *, drop=(), required=()):
        schema = _signatures.triton_schema(name, drop, required)
        if not schema.startswith("(Tensor "):
            raise ValueError("Triton op %s: the device guard needs a Tensor first argument, got %s" % (name, schema))
        self.name = name
        self.fn = fn

        def guarded(*args):
            return on_device(fn, args)

        guarded.__name__ = guarded.__qualname__ = "triton_" + name
        self.op = torch.library.custom_op("rlhf_kernels::triton_" + name, guarded, mutates_args=(), schema=schema)
        self.op.register_fake(_signatures.fake(name, schema))  # the native op's output shapes

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return on_device(self.fn, args)


class DifferentiableOp(Op):
    """A Triton op with autograd. ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)`` follow ``torch.library.register_autograd``'s conventions
    (``backward`` returns one gradient or None per input)."""

    def __init__(self, name, fn, setup_context, backward, *, drop=(), required=()):
        super().__init__(name, fn, drop=drop, required=required)
        self.op.register_autograd(backward, setup_context=setup_context)
        self.function = type("Triton_" + name, (torch.autograd.Function,), {
            "forward": staticmethod(fn),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        })

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return on_device(self.function.apply, args)
