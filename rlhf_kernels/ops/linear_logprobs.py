"""Log-probabilities and entropy straight from hidden states and the LM head.

    linear_token_logprobs(hidden, weight, labels) == token_logprobs(hidden @ weight.T + bias, labels)

without ever holding the [N, V] logits: at H = 4096, V = 152064 and 16k tokens they would be
5 GB in bf16. The vocabulary is walked in tiles; each tile's logits come from one matmul
(MKL on the CPU, cuBLAS on a GPU) and are folded at once into per-token float32 online-softmax
statistics (max, sum of exps, the entropy's sum, the label's logit). The backward recomputes
each tile's logits, turns them into the tile's gradient in place, and accumulates
d_hidden (float32), d_weight and d_bias tile by tile: four matmuls' worth of FLOPs instead
of three, for memory bounded by one tile instead of two [N, V] tensors.

Backends: ``cpu`` and ``cuda`` (native: checks, tiling and autograd in C++,
csrc/include/rlhf/linear_logprobs_op.h and csrc/autograd/derivatives.cpp, with C++ or
CUDA epilogues; one dispatcher call from here), ``triton`` (torch matmuls, Triton epilogues),
``torch`` (the chunked eager fallback: tokens in chunks with activation checkpointing).
Labels outside [0, V) (other than ``ignore_index``) raise when ``validate`` is true, as in
``token_logprobs`` (one host sync on a GPU; skipped by ``validate=False``, CUDA graph capture
and torch.compile graphs; then such a label gives NaN logp and entropy and no gradient).
"""

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._signatures import f32, grads_like, rows_f32, shape
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.ops import _vocab_parallel as vp
from rlhf_kernels.ops import _vocab_parallel_ops as vpo
from rlhf_kernels.ops.logprobs import (KERNEL_DTYPES, _check_ignore_index, _check_label_range, _check_labels,
                                       _check_temperature, _flat_labels)
from rlhf_kernels.reference import linear_logprobs as ref

# Logits elements per tile; 0 lets each backend choose (2 MiB of logits on the CPU,
# 256 MiB on a GPU). Tests set it small to exercise token and vocabulary tiling.
_TILE = 0
NATIVE = _backend.NATIVE
if _ext.loaded():
    _linear_logprobs_fwd = torch.ops.rlhf_kernels.linear_logprobs_fwd.default


def _check(op, hidden, weight, labels, bias):
    v.tensor(op, "hidden", hidden, kind="float")
    v.tensor(op, "weight", weight, ndim=2, kind="float")
    if hidden.dim() < 1:
        raise ValueError("%s: `hidden` must have shape [..., H], got a 0-d tensor" % op)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError("%s: `weight` must be [V, H] with H = %d (hidden's last dimension, hidden shape %s), "
                         "got %s" % (op, H, list(hidden.shape), list(weight.shape)))
    if weight.shape[0] == 0:
        raise ValueError("%s: `weight` has V = 0 rows (shape %s); the vocabulary must have at least one entry"
                         % (op, list(weight.shape)))
    if bias is not None:
        v.tensor(op, "bias", bias, ndim=1, kind="float")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError("%s: `bias` must be [V] = [%d] (weight shape %s), got %s"
                             % (op, weight.shape[0], list(weight.shape), list(bias.shape)))
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError("%s: `%s` must have the dtype of `hidden` (%s), got %s; cast one of them"
                            % (op, name, hidden.dtype, t.dtype))
    v.same_device(op, "hidden", hidden, weight=weight, bias=bias)
    _check_labels(op, "hidden", hidden, labels, "H")


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, validate=True, process_group=None, backend="auto"):
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / temperature),
    and optionally the entropy, without materializing the [..., V] logits.

    Args:
        hidden: [..., H] float32, float16 or bfloat16 hidden states (the LM head's input).
        weight: [V, H] the LM head's weight, hidden's dtype and device.
        labels: [...] integers; positions equal to ``ignore_index`` give 0 and get 0 gradient.
        bias: [V] or None, hidden's dtype.
        temperature: > 0, applied to the logits inside the kernel.
        return_entropy: also return H = -sum_v p log p per position (0 at ignored positions).
        validate: raise a ValueError for a label outside [0, V) other than ``ignore_index``.
            On a GPU the check reads the labels back: one host sync per call. It is skipped
            while a CUDA graph is being captured, and inside torch.compile graphs (except by
            the native CPU op, where it costs nothing). With ``validate=False`` (or where it is
            skipped) such a label gives NaN logp and entropy at its position and no gradient,
            never an out-of-bounds read.
        process_group: a torch.distributed group over which the LM head is split by vocabulary
            (see docs/tensor_parallel.md): ``weight`` [V_local, H] and ``bias`` [V_local] are this
            rank's rows (rank r holds ids [r * V_local, (r + 1) * V_local)), ``hidden`` is the same on
            every rank and labels are global ids. The outputs are the full-vocabulary values,
            bitwise the same on every rank; d_weight and d_bias are this slice of the full
            gradient; d_hidden is this rank's partial sum, which the caller reduces over the group
            (as for any column-parallel linear layer). One all-gather of 4 float32 per row in the
            forward, none in the backward. None (or a group of one): a single device.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        logp [...] float32, or (logp [...], entropy [...]) with ``return_entropy``. Equal to
        ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` within that op's tolerances.
        Differentiable wrt ``hidden``, ``weight`` and ``bias``; gradients come in their dtype
        (d_hidden is accumulated in float32 across vocabulary tiles).
    """
    op = "linear_token_logprobs"
    name = _backend.pick_kernel(op, backend, hidden, "hidden", KERNEL_DTYPES)
    if torch.compiler.is_compiling():
        validate = validate and not hidden.is_cuda  # no host sync inside a compiled graph
    if name in NATIVE and process_group is None:
        try:
            logp, entropy, _ = _linear_logprobs_fwd(hidden, weight, bias, labels, temperature, ignore_index, _TILE,
                                                    validate)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return (logp, entropy) if return_entropy else logp
    _check(op, hidden, weight, labels, bias)
    temperature = _check_temperature(op, temperature)
    ignore_index = _check_ignore_index(op, ignore_index)
    V = weight.shape[0]
    shard = None if process_group is None else vp.vocab_shard(op, process_group, V)
    if shard is None and process_group is not None and name in NATIVE:  # a group of one
        return linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                     ignore_index=ignore_index, return_entropy=return_entropy,
                                     validate=validate, backend=name)
    if validate and not torch.compiler.is_compiling():
        _check_label_range(op, labels, V if shard is None else shard.v_global, ignore_index)
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    h = hidden.reshape(-1, H).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = _flat_labels(labels)
    if shard is not None:
        logp, entropy = vpo.linear_token_logprobs(h, w, b, y, temperature, ignore_index, _TILE, name, shard)
    elif name == "torch":
        logp, entropy = ref.chunked_linear_token_logprobs(h, w, y, b, temperature, ignore_index)
    else:
        from rlhf_kernels.triton import linear_logprobs as tri
        logp, entropy, _ = tri.linear_token_logprobs(h, w, b, y, temperature, ignore_index, _TILE)
    logp, entropy = logp.reshape(lead), entropy.reshape(lead)
    return (logp, entropy) if return_entropy else logp


# ---- output shapes of the native ops and their Triton twins (rlhf_kernels/_signatures.py) ----

@shape("linear_logprobs_fwd")
def _linear_logprobs_shapes(hidden, **_):
    return f32(hidden, hidden.shape[:-1]), f32(hidden, hidden.shape[:-1]), rows_f32(hidden, 2)


@shape("linear_logprobs_bwd")
def _linear_logprobs_grad_shapes(hidden, weight, need_hidden, need_weight, need_bias, **_):
    return grads_like(hidden, weight, need_hidden, need_weight, need_bias)
