"""Per-token log-probabilities, entropy and KL from logits.

With ``s = logits / temperature`` over the last dimension (the vocabulary, size V) and
``p = softmax(s)``:
    token_logprobs:  logp_t = s_t[y_t] - logsumexp(s_t)
    token_entropy:   H_t    = -sum_v p_tv log p_tv  = logsumexp(s_t) - sum_v p_tv s_tv
    full_kl:         KL_t   = sum_v p_tv (log p_tv - log q_tv),  q = softmax(ref_logits / temperature)
    kl_penalty:      k1/k2/k3/abs estimators of KL from sampled log-probabilities

The native and Triton kernels read the logits once in the forward (an online softmax over
vocabulary chunks), save only float32 statistics per row (the max, log of the sum of exps, the entropy), and
in the backward read the logits once and write the gradient once, in the logits' dtype.
The temperature is applied inside the kernels: the caller's logits are never modified,
unless ``inplace_backward=True`` asks for the gradient to be written over them.

Labels outside [0, V) (other than ``ignore_index``) raise. The ``cpu`` backend checks
them inside the kernel; the ``cuda``, ``triton`` and ``torch`` backends check them here,
which costs one host sync on a GPU (skipped while ``torch.compile`` traces).
Non-contiguous logits are copied to a contiguous tensor first.
"""

import math

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import logprobs as ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KL_KINDS = ("k1", "k2", "k3", "abs")


def _has_native_ops():
    return _ext.loaded() and hasattr(torch.ops.rlhf_kernels, "token_logprobs_fwd")


def _resolve(op, backend, logits):
    """The backend for this call: the kernels serve float32/float16/bfloat16 logits."""
    return _backend.resolve_kernel(op, backend, logits, "logits", "token_logprobs_fwd", KERNEL_DTYPES)


def _check_logits(op, name, logits):
    v.tensor(op, name, logits, kind="float")
    if logits.dim() < 1:
        raise ValueError("%s: `%s` must have shape [..., V], got a 0-d tensor" % (op, name))
    if logits.shape[-1] == 0:
        raise ValueError("%s: `%s` has V = 0 (shape %s); the vocabulary dimension must be >= 1"
                         % (op, name, tuple(logits.shape)))


def _check_temperature(op, temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError("%s: `temperature` must be a number, got %r" % (op, temperature))
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError("%s: `temperature` must be a finite number > 0, got %r" % (op, temperature))


def _check_labels(op, logits, labels, ignore_index):
    v.tensor(op, "labels", labels, kind="int")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError("%s: `labels` must have shape %s (logits' shape %s without V), got %s"
                         % (op, tuple(logits.shape[:-1]), tuple(logits.shape), tuple(labels.shape)))
    v.same_device(op, "logits", logits, labels=labels)


def _check_label_range(op, labels, V, ignore_index):
    """Host-side range check (one sync on a GPU); the cpu kernels check in the kernel."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0, 0])
        raise ValueError("%s: `labels` must be in [0, V) = [0, %d) or equal ignore_index = %d, but labels[%d] "
                         "(flat index) = %d" % (op, V, ignore_index, i, int(labels.reshape(-1)[i])))


def _rows(logits):
    """[..., V] -> [N, V] contiguous (a view when already contiguous)."""
    return logits.contiguous().reshape(-1, logits.shape[-1])


def _flat_labels(labels):
    y = labels.reshape(-1)
    if y.dtype not in (torch.int32, torch.int64):
        y = y.long()
    return y.contiguous()


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False, backend="auto"):
    """Log-probability of each label under softmax(logits / temperature), and optionally the entropy.

    Args:
        logits: [..., V] float32, float16 or bfloat16 (other float dtypes use the torch backend).
        labels: [...] int32 or int64; positions equal to ``ignore_index`` give 0 and get 0 gradient.
        temperature: > 0, applied inside the kernel (the logits are not modified).
        return_entropy: also return H = -sum_v p log p per position (0 at ignored positions).
        inplace_backward: write the gradient over ``logits`` in the backward (saves one [N, V]
            buffer; the logits are garbage afterwards). Kernel backends only, eager mode only.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        logp [...] float32, or (logp [...], entropy [...]) with ``return_entropy``.
        Differentiable wrt ``logits``: dlogits = g_logp (onehot(y) - p) / T - g_H p (log p + H) / T.
    """
    op = "token_logprobs"
    _check_logits(op, "logits", logits)
    _check_labels(op, logits, labels, ignore_index)
    _check_temperature(op, temperature)
    ignore_index = int(ignore_index)
    name = _resolve(op, backend, logits)
    lead, V = logits.shape[:-1], logits.shape[-1]
    if name != "cpu":
        _check_label_range(op, labels, V, ignore_index)
    if name == "torch":
        logp, entropy = ref.token_logprobs(logits.float(), labels, float(temperature), ignore_index)
    else:
        z, y = _rows(logits), _flat_labels(labels)
        if name == "triton":
            from rlhf_kernels.triton import logprobs as tri
            logp, entropy = tri.token_logprobs(z, y, float(temperature), ignore_index, bool(inplace_backward))
        elif inplace_backward and torch.is_grad_enabled() and z.requires_grad:
            logp, entropy = _NativeInplace.apply(z, y, float(temperature), ignore_index)
        else:
            logp, entropy, _ = torch.ops.rlhf_kernels.token_logprobs_fwd(z, y, float(temperature), ignore_index)
        logp, entropy = logp.reshape(lead), entropy.reshape(lead)
    return (logp, entropy) if return_entropy else logp


def token_entropy(logits, *, temperature=1.0, backend="auto"):
    """Entropy of softmax(logits / temperature) per position.

    Args:
        logits: [..., V] float32, float16 or bfloat16.
    Returns:
        H [...] float32 = logsumexp(s) - sum_v p_v s_v, s = logits / T. Differentiable wrt
        ``logits``: dH/dz_v = -p_v (log p_v + H) / T.
    """
    op = "token_entropy"
    _check_logits(op, "logits", logits)
    _check_temperature(op, temperature)
    name = _resolve(op, backend, logits)
    lead = logits.shape[:-1]
    if name == "torch":
        return ref.token_entropy(logits.float(), float(temperature))
    z = _rows(logits)
    if name == "triton":
        from rlhf_kernels.triton import logprobs as tri
        entropy = tri.token_entropy(z, float(temperature))
    else:
        entropy, _ = torch.ops.rlhf_kernels.token_entropy_fwd(z, float(temperature))
    return entropy.reshape(lead)


def full_kl(logits, ref_logits, *, temperature=1.0, backend="auto"):
    """KL(pi || pi_ref) over the whole vocabulary per position, in one pass over both tensors.

    Args:
        logits: [..., V] float32, float16 or bfloat16, the policy.
        ref_logits: [..., V], same shape, dtype and device: the reference policy (treated as a
            constant: no gradient flows to it).
    Returns:
        KL [...] float32 = sum_v p_v (log p_v - log q_v), p = softmax(logits / T),
        q = softmax(ref_logits / T). Differentiable wrt ``logits``:
        dKL/dz_v = p_v (log p_v - log q_v - KL) / T.
    """
    op = "full_kl"
    _check_logits(op, "logits", logits)
    v.tensor(op, "ref_logits", ref_logits, kind="float")
    v.same_shape(op, "logits", logits, "ref_logits", ref_logits)
    v.same_device(op, "logits", logits, ref_logits=ref_logits)
    if ref_logits.dtype != logits.dtype:
        raise TypeError("full_kl: `ref_logits` must have the dtype of `logits` (%s), got %s"
                        % (logits.dtype, ref_logits.dtype))
    _check_temperature(op, temperature)
    name = _resolve(op, backend, logits)
    lead = logits.shape[:-1]
    ref_logits = ref_logits.detach()
    if name == "torch":
        return ref.full_kl(logits.float(), ref_logits.float(), float(temperature))
    z, zr = _rows(logits), _rows(ref_logits)
    if name == "triton":
        from rlhf_kernels.triton import logprobs as tri
        kl = tri.full_kl(z, zr, float(temperature))
    else:
        kl, _ = torch.ops.rlhf_kernels.full_kl_fwd(z, zr, float(temperature))
    return kl.reshape(lead)


def kl_penalty(logprobs, ref_logprobs, kind="k1", *, clamp=None):
    """Per-token KL estimate from the log-probabilities of sampled tokens (elementwise).

    With log_r = logprobs - ref_logprobs (samples drawn from the policy):
        k1 = log_r,  k2 = log_r**2 / 2,  k3 = exp(-log_r) - 1 + log_r,  abs = |log_r|
    ``clamp=c`` clamps the estimate to [-c, c] (zero gradient where clamped).

    Args:
        logprobs, ref_logprobs: float tensors of one shape, on one device.
    Returns:
        float32 tensor of that shape, differentiable wrt both inputs.
    """
    op = "kl_penalty"
    v.tensor(op, "logprobs", logprobs, kind="float")
    v.tensor(op, "ref_logprobs", ref_logprobs, kind="float")
    v.same_shape(op, "logprobs", logprobs, "ref_logprobs", ref_logprobs)
    v.same_device(op, "logprobs", logprobs, ref_logprobs=ref_logprobs)
    if kind not in KL_KINDS:
        raise ValueError("kl_penalty: `kind` must be one of %s, got %r" % (", ".join(KL_KINDS), kind))
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0):
        raise ValueError("kl_penalty: `clamp` must be None or a number > 0, got %r" % (clamp,))
    log_r = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        out = log_r
    elif kind == "k2":
        out = 0.5 * log_r * log_r
    elif kind == "k3":
        out = torch.expm1(-log_r) + log_r  # expm1 keeps the small-log_r regime accurate
    else:
        out = log_r.abs()
    if clamp is not None:
        out = out.clamp(-float(clamp), float(clamp))
    return out


class _NativeInplace(torch.autograd.Function):
    """token_logprobs on the native ops with the gradient written over the logits (eager only)."""

    @staticmethod
    def forward(ctx, z, y, temperature, ignore_index):
        logp, entropy, stats = torch.ops.rlhf_kernels.token_logprobs_fwd(z, y, temperature, ignore_index)
        ctx.save_for_backward(z, y, stats, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        z, y, stats, entropy = ctx.saved_tensors
        torch.ops.rlhf_kernels.logprobs_bwd_inplace(z, y, _grad(g_logp), _grad(g_entropy), stats, entropy,
                                                   ctx.temperature, ctx.ignore_index)
        return z, None, None, None


def _grad(g):
    return None if g is None else g.float().contiguous()


# ---- torch.library registrations of the native ops: fake kernels and autograd ----

if _has_native_ops():
    def _rows_f32(logits, *cols):
        return logits.new_empty((logits.shape[0],) + cols, dtype=torch.float32)

    @torch.library.register_fake("rlhf_kernels::token_logprobs_fwd")
    def _token_logprobs_fwd_fake(logits, labels, temperature, ignore_index):
        return _rows_f32(logits), _rows_f32(logits), _rows_f32(logits, 2)

    @torch.library.register_fake("rlhf_kernels::token_entropy_fwd")
    def _token_entropy_fwd_fake(logits, temperature):
        return _rows_f32(logits), _rows_f32(logits, 2)

    @torch.library.register_fake("rlhf_kernels::logprobs_bwd")
    def _logprobs_bwd_fake(logits, labels, grad_logp, grad_entropy, stats, entropy, temperature, ignore_index):
        return torch.empty_like(logits)

    @torch.library.register_fake("rlhf_kernels::logprobs_bwd_inplace")
    def _logprobs_bwd_inplace_fake(logits, labels, grad_logp, grad_entropy, stats, entropy, temperature,
                                   ignore_index):
        return None

    @torch.library.register_fake("rlhf_kernels::full_kl_fwd")
    def _full_kl_fwd_fake(logits, ref_logits, temperature):
        return _rows_f32(logits), _rows_f32(logits, 4)

    @torch.library.register_fake("rlhf_kernels::full_kl_bwd")
    def _full_kl_bwd_fake(grad_kl, logits, ref_logits, kl, stats, temperature):
        return torch.empty_like(logits)

    # Saved between forward and backward: the logits (the caller's tensor, no copy), the
    # per-row statistics [N, 2] = (max, log sum exp(s - max)) and the entropy output.
    def _token_logprobs_setup(ctx, inputs, output):
        logits, labels, temperature, ignore_index = inputs
        _, entropy, stats = output
        ctx.save_for_backward(logits, labels, stats, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.mark_non_differentiable(stats)

    def _token_logprobs_backward(ctx, g_logp, g_entropy, _g_stats):
        logits, labels, stats, entropy = ctx.saved_tensors
        grad = torch.ops.rlhf_kernels.logprobs_bwd(logits, labels, _grad(g_logp), _grad(g_entropy), stats, entropy,
                                                   ctx.temperature, ctx.ignore_index)
        return grad, None, None, None

    torch.library.register_autograd("rlhf_kernels::token_logprobs_fwd", _token_logprobs_backward,
                                    setup_context=_token_logprobs_setup)

    def _token_entropy_setup(ctx, inputs, output):
        logits, temperature = inputs
        entropy, stats = output
        ctx.save_for_backward(logits, stats, entropy)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(stats)

    def _token_entropy_backward(ctx, g_entropy, _g_stats):
        logits, stats, entropy = ctx.saved_tensors
        grad = torch.ops.rlhf_kernels.logprobs_bwd(logits, None, None, _grad(g_entropy), stats, entropy,
                                                   ctx.temperature, 0)
        return grad, None

    torch.library.register_autograd("rlhf_kernels::token_entropy_fwd", _token_entropy_backward,
                                    setup_context=_token_entropy_setup)

    def _full_kl_setup(ctx, inputs, output):
        logits, ref_logits, temperature = inputs
        kl, stats = output
        ctx.save_for_backward(logits, ref_logits, kl, stats)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(stats)

    def _full_kl_backward(ctx, g_kl, _g_stats):
        logits, ref_logits, kl, stats = ctx.saved_tensors
        if g_kl is None:
            return torch.zeros_like(logits), None, None
        grad = torch.ops.rlhf_kernels.full_kl_bwd(_grad(g_kl), logits, ref_logits, kl, stats, ctx.temperature)
        return grad, None, None

    torch.library.register_autograd("rlhf_kernels::full_kl_fwd", _full_kl_backward, setup_context=_full_kl_setup)
