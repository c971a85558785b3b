"""Argument checks of the public ops, for the backends that run Python (torch, triton).

The native backends (cpu, cuda) check the same things in C++ (csrc/include/rlhf/checks.h)
and raise the same exception types: TypeError for a wrong type or dtype, ValueError for a
wrong shape, device or value. tests/test_bad_inputs.py holds every backend to that. Every
error names the op, the argument, what was expected and what came in.
"""

import math
import numbers

import torch


def tensor(op, name, t, ndim=None, kind=None):
    """Check that ``t`` is a tensor; ``kind`` is 'float', 'int' or 'mask' (bool or integer)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s: `%s` must be a torch.Tensor, got %s" % (op, name, type(t).__name__))
    if kind == "float" and not t.is_floating_point():
        raise TypeError("%s: `%s` must be a floating-point tensor, got %s" % (op, name, t.dtype))
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError("%s: `%s` must be an integer tensor, got %s" % (op, name, t.dtype))
    if kind == "mask" and (t.is_floating_point() or t.is_complex()):
        raise TypeError("%s: `%s` must be a bool or integer tensor (nonzero = true), got %s; for a float mask "
                        "pass `%s.bool()` or `%s > 0.5`" % (op, name, t.dtype, name, name))
    if ndim is not None and t.dim() != ndim:
        raise ValueError("%s: `%s` must have %d dimension(s), got shape %s" % (op, name, ndim, list(t.shape)))
    return t


_NO_MASK = object()


def floats(op, names, tensors, ndim=None, mask=_NO_MASK, device=True):
    """Check float tensors of one shape (an op's [B, T] or [P] inputs), in this order: each a
    floating-point tensor, the first with ``ndim`` dimensions, ``mask`` (when given) a bool or
    integer tensor, all of the first's shape and, with ``device``, on its device."""
    for name, t in zip(names, tensors):
        tensor(op, name, t, kind="float")
    if ndim is not None:
        tensor(op, names[0], tensors[0], ndim=ndim)
    masks = {} if mask is _NO_MASK else {"mask": mask}
    if masks:
        tensor(op, "mask", mask, kind="mask")
    for name, t in zip(names[1:], tensors[1:]):
        same_shape(op, names[0], tensors[0], name, t)
    if masks:
        same_shape(op, names[0], tensors[0], "mask", mask)
    if device:
        same_device(op, names[0], tensors[0], **masks, **dict(zip(names[1:], tensors[1:])))


def same_shape(op, a_name, a, b_name, b):
    if a.shape != b.shape:
        raise ValueError("%s: `%s` has shape %s but `%s` has shape %s; they must match"
                         % (op, b_name, list(b.shape), a_name, list(a.shape)))


def same_device(op, ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError("%s: `%s` is on %s but `%s` is on %s; all tensors must be on one device"
                             % (op, name, t.device, ref_name, ref.device))


def number(op, name, value, lo=None, hi=None, lo_open=False, allow_none=False):
    """``value`` as a float, checked to be a real number in the given range."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError("%s: `%s` must be a number%s, got %r" % (op, name, " or None" if allow_none else "", value))
    value = float(value)
    if math.isnan(value) or (lo is not None and (value < lo or (lo_open and value == lo))) or \
            (hi is not None and value > hi):
        if lo is not None and hi is not None:
            want = "in [%g, %g]" % (lo, hi)
        elif lo is not None:
            want = "%s %g" % (">" if lo_open else ">=", lo)
        else:
            want = "<= %g" % hi
        raise ValueError("%s: `%s` must be %s, got %r" % (op, name, want, value))
    return value


def choice(op, name, value, allowed, quote=False):
    """``value`` checked to be one of ``allowed`` (strings, and None where it is allowed), else
    a ValueError naming the argument and the allowed values (``quote``: as Python literals).
    Returns ``allowed[value]`` where ``allowed`` is a dict (the value's code), else ``value``."""
    if (value is not None and not isinstance(value, str)) or value not in allowed:
        raise ValueError("%s: `%s` must be one of %s, got %r"
                         % (op, name, ", ".join(map(repr if quote else str, allowed)), value))
    return allowed[value] if isinstance(allowed, dict) else value


def num_tokens_args(op, num_tokens):
    """(tensor, number): the native ops' two ways of taking a loss's ``num_tokens`` (the global
    normalizer of "token-mean"; at most one set)."""
    if num_tokens is None or isinstance(num_tokens, torch.Tensor):
        return num_tokens, None
    return None, number(op, "num_tokens", num_tokens, lo=0.0, lo_open=True)


def num_tokens(op, value, device):
    """The Python backends' check of a loss's ``num_tokens``: None, or a 0-d float64 tensor on
    ``device``."""
    nt, value = num_tokens_args(op, value)
    if value is not None:
        return torch.full((), value, dtype=torch.float64, device=device)
    if nt is None:
        return None
    if nt.numel() != 1 or nt.dim() > 1:
        raise ValueError("%s: `num_tokens` must be a number or a 0-d tensor, got shape %s" % (op, list(nt.shape)))
    if nt.is_complex() or nt.dtype == torch.bool:
        raise TypeError("%s: `num_tokens` must be a real number tensor, got %s" % (op, nt.dtype))
    if nt.device != device:
        raise ValueError("%s: `num_tokens` is on %s but the inputs are on %s" % (op, nt.device, device))
    return nt.detach().reshape(()).to(torch.float64)


def as_f32(t):
    return t.to(torch.float32).contiguous()


def as_mask(t):
    """A contiguous bool tensor: true where ``t`` is nonzero."""
    return (t if t.dtype == torch.bool else t != 0).contiguous()


def schema_error(op, err):
    """The exception to raise for a RuntimeError from calling a native op: the dispatcher's
    "Expected a value of type ..." (an argument of the wrong Python type) becomes the
    TypeError the Python checks raise; anything else is re-raised as it is."""
    msg = str(err)
    if "Expected a value of type" in msg or "expected" in msg and "but instead found type" in msg:
        return TypeError("%s: %s" % (op, msg.splitlines()[0]))
    return err
