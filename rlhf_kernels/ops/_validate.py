"""Argument checks shared by the public ops. Every error names the op, the argument,
what was expected and what came in."""

import torch


def tensor(op, name, t, ndim=None, kind=None):
    """Check that ``t`` is a tensor; ``kind`` is 'float', 'int' or 'mask' (bool or numeric)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s: `%s` must be a torch.Tensor, got %s" % (op, name, type(t).__name__))
    if ndim is not None and t.dim() != ndim:
        raise ValueError("%s: `%s` must have %d dimension(s), got shape %s" % (op, name, ndim, tuple(t.shape)))
    if kind == "float" and not t.is_floating_point():
        raise TypeError("%s: `%s` must be a floating-point tensor, got %s" % (op, name, t.dtype))
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError("%s: `%s` must be an integer tensor, got %s" % (op, name, t.dtype))
    if kind == "mask" and (t.is_complex()):
        raise TypeError("%s: `%s` must be bool or 0/1 numbers, got %s" % (op, name, t.dtype))
    return t


def same_shape(op, a_name, a, b_name, b):
    if a.shape != b.shape:
        raise ValueError("%s: `%s` has shape %s but `%s` has shape %s; they must match"
                         % (op, a_name, tuple(a.shape), b_name, tuple(b.shape)))


def same_device(op, ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError("%s: `%s` is on %s but `%s` is on %s; all tensors must be on one device"
                             % (op, name, t.device, ref_name, ref.device))


def as_f32(t):
    return t.to(torch.float32).contiguous()


def as_mask(t):
    """A contiguous bool tensor: true where ``t`` is nonzero."""
    return (t if t.dtype == torch.bool else t != 0).contiguous()
