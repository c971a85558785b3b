"""Log-probabilities and entropy straight from hidden states and the LM head.

    linear_token_logprobs(hidden, weight, labels) == token_logprobs(hidden @ weight.T + bias, labels)

without ever holding the [N, V] logits: at H = 4096, V = 152064 and 16k tokens they would be
5 GB in bf16. The vocabulary is walked in tiles; each tile's logits come from one matmul
(MKL on the CPU, cuBLAS on a GPU) and are folded at once into per-token float32 online-softmax
statistics (max, sum of exps, the entropy's sum, the label's logit). The backward recomputes
each tile's logits, turns them into the tile's gradient in place, and accumulates
d_hidden (float32), d_weight and d_bias tile by tile: four matmuls' worth of FLOPs instead
of three, for memory bounded by one tile instead of two [N, V] tensors.

Backends: ``cpu`` and ``cuda`` (native: the tiling in C++, csrc/include/rlhf/linear_logprobs.h,
with C++ or CUDA epilogues), ``triton`` (torch matmuls, Triton epilogues), ``torch`` (the chunked
eager fallback: tokens in chunks with activation checkpointing).
Labels outside [0, V) (other than ``ignore_index``) raise: inside the kernel for ``cpu``, here
for the others (one host sync on a GPU, skipped while ``torch.compile`` traces).
"""

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.ops.logprobs import KERNEL_DTYPES, _check_label_range, _check_temperature, _flat_labels
from rlhf_kernels.reference import linear_logprobs as ref

# Logits elements per tile; 0 lets each backend choose (2 MiB of logits on the CPU,
# 256 MiB on a GPU). Tests set it small to exercise token and vocabulary tiling.
_TILE = 0


def _has_native_ops():
    return _ext.loaded() and hasattr(torch.ops.rlhf_kernels, "linear_logprobs_fwd")


def _resolve(op, backend, hidden):
    """The backend for this call: the kernels serve float32/float16/bfloat16 hidden states."""
    return _backend.resolve_kernel(op, backend, hidden, "hidden", "linear_logprobs_fwd", KERNEL_DTYPES)


def _check(op, hidden, weight, labels, bias):
    v.tensor(op, "hidden", hidden, kind="float")
    v.tensor(op, "weight", weight, ndim=2, kind="float")
    v.tensor(op, "labels", labels, kind="int")
    if hidden.dim() < 1:
        raise ValueError("%s: `hidden` must have shape [..., H], got a 0-d tensor" % op)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError("%s: `weight` must be [V, H] with H = %d (hidden's last dimension, hidden shape %s), "
                         "got %s" % (op, H, tuple(hidden.shape), tuple(weight.shape)))
    if weight.shape[0] == 0:
        raise ValueError("%s: `weight` has V = 0 rows (shape %s); the vocabulary must have at least one entry"
                         % (op, tuple(weight.shape)))
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError("%s: `labels` must have shape %s (hidden's shape %s without H), got %s"
                         % (op, tuple(hidden.shape[:-1]), tuple(hidden.shape), tuple(labels.shape)))
    if bias is not None:
        v.tensor(op, "bias", bias, ndim=1, kind="float")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError("%s: `bias` must be [V] = [%d] (weight shape %s), got %s"
                             % (op, weight.shape[0], tuple(weight.shape), tuple(bias.shape)))
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError("%s: `%s` must have the dtype of `hidden` (%s), got %s; cast one of them"
                            % (op, name, hidden.dtype, t.dtype))
    v.same_device(op, "hidden", hidden, weight=weight, labels=labels, bias=bias)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, backend="auto"):
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / temperature),
    and optionally the entropy, without materializing the [..., V] logits.

    Args:
        hidden: [..., H] float32, float16 or bfloat16 hidden states (the LM head's input).
        weight: [V, H] the LM head's weight, hidden's dtype and device.
        labels: [...] int32 or int64; positions equal to ``ignore_index`` give 0 and get 0 gradient.
        bias: [V] or None, hidden's dtype.
        temperature: > 0, applied to the logits inside the kernel.
        return_entropy: also return H = -sum_v p log p per position (0 at ignored positions).
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        logp [...] float32, or (logp [...], entropy [...]) with ``return_entropy``. Equal to
        ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` within that op's tolerances.
        Differentiable wrt ``hidden``, ``weight`` and ``bias``; gradients come in their dtype
        (d_hidden is accumulated in float32 across vocabulary tiles).
    """
    op = "linear_token_logprobs"
    _check(op, hidden, weight, labels, bias)
    _check_temperature(op, temperature)
    ignore_index = int(ignore_index)
    name = _resolve(op, backend, hidden)
    lead, H, V = hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    if name != "cpu":
        _check_label_range(op, labels, V, ignore_index)
    h = hidden.reshape(-1, H).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = _flat_labels(labels)
    if name == "torch":
        logp, entropy = ref.chunked_linear_token_logprobs(h, w, y, b, float(temperature), ignore_index)
    elif name == "triton":
        from rlhf_kernels.triton import linear_logprobs as tri
        logp, entropy = tri.linear_token_logprobs(h, w, b, y, float(temperature), ignore_index, _TILE)
    else:
        logp, entropy, _ = torch.ops.rlhf_kernels.linear_logprobs_fwd(h, w, b, y, float(temperature), ignore_index,
                                                                      _TILE)
    logp, entropy = logp.reshape(lead), entropy.reshape(lead)
    return (logp, entropy) if return_entropy else logp


def _grad(g):
    return None if g is None else g.float().contiguous()


# ---- torch.library registrations of the native ops: fake kernels and autograd ----

if _has_native_ops():
    @torch.library.register_fake("rlhf_kernels::linear_logprobs_fwd")
    def _linear_logprobs_fwd_fake(hidden, weight, bias, labels, temperature, ignore_index, tile):
        N = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return hidden.new_empty((N,), **f32), hidden.new_empty((N,), **f32), hidden.new_empty((N, 2), **f32)

    @torch.library.register_fake("rlhf_kernels::linear_logprobs_bwd")
    def _linear_logprobs_bwd_fake(hidden, weight, bias, labels, grad_logp, grad_entropy, stats, entropy,
                                  temperature, ignore_index, tile, need_hidden, need_weight, need_bias):
        return (torch.empty_like(hidden) if need_hidden else hidden.new_empty((0,)),
                torch.empty_like(weight) if need_weight else hidden.new_empty((0,)),
                hidden.new_empty((weight.shape[0],)) if need_bias else hidden.new_empty((0,)))

    # Saved between forward and backward: the caller's hidden, weight and bias (no copies),
    # the labels, the per-row statistics [N, 2] = (max, log sum exp(s - max)) and the entropy.
    def _linear_setup(ctx, inputs, output):
        hidden, weight, bias, labels, temperature, ignore_index, tile = inputs
        _, entropy, stats = output
        ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
        ctx.args = (temperature, ignore_index, tile)
        ctx.mark_non_differentiable(stats)

    def _linear_backward(ctx, g_logp, g_entropy, _g_stats):
        hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
        temperature, ignore_index, tile = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        d_h, d_w, d_b = torch.ops.rlhf_kernels.linear_logprobs_bwd(
            hidden, weight, bias, labels, _grad(g_logp), _grad(g_entropy), stats, entropy, temperature,
            ignore_index, tile, need_h, need_w, need_b)
        return (d_h if need_h else None, d_w if need_w else None, d_b if need_b else None,
                None, None, None, None)

    torch.library.register_autograd("rlhf_kernels::linear_logprobs_fwd", _linear_backward,
                                    setup_context=_linear_setup)
