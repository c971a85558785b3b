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

The native backends (cpu, cuda) take the arguments as they come: checks, the contiguous
copy of non-contiguous logits, the [..., V] -> [N, V] view and the autograd wiring are all
in C++ (csrc/include/rlhf/logprobs_op.h, csrc/autograd/logprobs.cpp), so a call is one
dispatcher call. The triton and torch backends check here (rlhf_kernels/ops/_validate.py
raises the same exception types).

Labels outside [0, V) (other than ``ignore_index``) raise a ValueError when ``validate``
is true (the default). On a GPU that check reads the labels back: one host sync per call.
``validate=False`` skips it, and so do CUDA graph capture and torch.compile graphs (but for
the native CPU op, whose check is free); then such a label gives NaN logp and entropy for
its position and a zero gradient row, never an out-of-bounds read. A NaN in a row of logits
gives NaN outputs and gradient in that row only.
"""

import math
import numbers

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._signatures import f32, rows_f32, shape
from rlhf_kernels._layout import KL_KINDS  # noqa: F401 (re-exported)
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.ops import _vocab_parallel as vp
from rlhf_kernels.ops import _vocab_parallel_ops as vpo
from rlhf_kernels.reference import logprobs as ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NATIVE = _backend.NATIVE
if _ext.loaded():
    _token_logprobs_fwd = torch.ops.rlhf_kernels.token_logprobs_fwd.default
    _token_entropy_fwd = torch.ops.rlhf_kernels.token_entropy_fwd.default
    _full_kl_fwd = torch.ops.rlhf_kernels.full_kl_fwd.default


def _check_logits(op, name, logits):
    v.tensor(op, name, logits, kind="float")
    if logits.dim() < 1:
        raise ValueError("%s: `%s` must have shape [..., V], got a 0-d tensor" % (op, name))
    if logits.shape[-1] == 0:
        raise ValueError("%s: `%s` has V = 0 (shape %s); the vocabulary dimension must be >= 1"
                         % (op, name, list(logits.shape)))


def _check_temperature(op, temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError("%s: `temperature` must be a number, got %r" % (op, temperature))
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError("%s: `temperature` must be a finite number > 0, got %r" % (op, temperature))
    return t


def _check_ignore_index(op, ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError("%s: `ignore_index` must be an int, got %r" % (op, ignore_index))
    return int(ignore_index)


def _check_labels(op, ref_name, rows, labels, last):
    """labels [...]: integers shaped like ``rows`` ([..., last]) without its last dimension."""
    v.tensor(op, "labels", labels, kind="int")
    if list(labels.shape) != list(rows.shape[:-1]):
        raise ValueError("%s: `labels` must have shape %s (%s' shape %s without %s), got %s"
                         % (op, list(rows.shape[:-1]), ref_name, list(rows.shape), last, list(labels.shape)))
    v.same_device(op, ref_name, rows, labels=labels)


def _check_label_range(op, labels, V, ignore_index):
    """Labels outside [0, V) other than ignore_index raise (the torch and triton backends'
    ``validate``; the native ops check in C++). Reads the labels: one host sync on a GPU."""
    if labels.numel() == 0 or (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0, 0])
        raise ValueError("%s: `labels` must be in [0, V) = [0, %d) or equal ignore_index = %d, but labels[%d] "
                         "(flat index) = %d" % (op, V, ignore_index, i, int(labels.reshape(-1)[i])))


def _rows(t):
    """[..., X] -> [N, X] contiguous (a view when already contiguous)."""
    return t.contiguous().reshape(-1, t.shape[-1])


def _flat_labels(labels):
    y = labels.reshape(-1)
    if y.dtype not in (torch.int32, torch.int64):
        y = y.long()
    return y.contiguous()


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                   inplace_backward=False, validate=True, process_group=None, backend="auto"):
    """Log-probability of each label under softmax(logits / temperature), and optionally the entropy.

    Args:
        logits: [..., V] float32, float16 or bfloat16 (other float dtypes use the torch backend);
            any strides.
        labels: [...] integers; positions equal to ``ignore_index`` give 0 and get 0 gradient.
        temperature: > 0, applied inside the kernel (the logits are not modified).
        return_entropy: also return H = -sum_v p log p per position (0 at ignored positions).
        inplace_backward: write the gradient over ``logits`` in the backward (saves one [..., V]
            buffer; the logits hold the gradient afterwards). Kernel backends only, eager mode
            only (ignored while torch.compile traces).
        validate: raise a ValueError for a label outside [0, V) other than ``ignore_index``.
            On a GPU the check reads the labels back: one host sync per call. It is skipped
            while a CUDA graph is being captured, and inside torch.compile graphs (except by
            the native CPU op, where it costs nothing). With ``validate=False`` (or where it is
            skipped) such a label gives NaN logp and entropy at its position and a zero gradient
            row, never an out-of-bounds read.
        process_group: a torch.distributed group over which the vocabulary is split (see
            docs/tensor_parallel.md): ``logits`` is this rank's slice [..., V_local] (rank r holds
            ids [r * V_local, (r + 1) * V_local)), labels are global ids in [0, W * V_local); the
            outputs are the full-vocabulary values, bitwise the same on every rank, and the
            gradient is this slice of the full gradient. One all-gather of 4 float32 per row in
            the forward, none in the backward. None (or a group of one): a single device.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        logp [...] float32, or (logp [...], entropy [...]) with ``return_entropy``.
        Differentiable wrt ``logits``: dlogits = g_logp (onehot(y) - p) / T - g_H p (log p + H) / T.
    """
    op = "token_logprobs"
    name = _backend.pick_kernel(op, backend, logits, "logits", KERNEL_DTYPES)
    if torch.compiler.is_compiling():
        inplace_backward = False  # a traced backward must not write over an input
        validate = validate and not logits.is_cuda  # no host sync inside a compiled graph
    if process_group is not None:
        out = _vocab_parallel_logprobs(op, name, logits, labels, temperature, ignore_index, inplace_backward,
                                       validate, process_group)
        if out is not None:
            return out if return_entropy else out[0]
    if name in NATIVE:
        try:
            logp, entropy, _ = _token_logprobs_fwd(logits, labels, temperature, ignore_index, validate,
                                                   inplace_backward)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return (logp, entropy) if return_entropy else logp
    _check_logits(op, "logits", logits)
    _check_labels(op, "logits", logits, labels, "V")
    temperature = _check_temperature(op, temperature)
    ignore_index = _check_ignore_index(op, ignore_index)
    if validate and not torch.compiler.is_compiling():
        _check_label_range(op, labels, logits.shape[-1], ignore_index)
    if name == "torch":
        logp, entropy = ref.token_logprobs(logits.float(), labels, temperature, ignore_index)
    else:
        from rlhf_kernels.triton import logprobs as tri
        logp, entropy, _ = tri.token_logprobs(_rows(logits), _flat_labels(labels), temperature, ignore_index,
                                              bool(inplace_backward))
        lead = logits.shape[:-1]
        logp, entropy = logp.reshape(lead), entropy.reshape(lead)
    return (logp, entropy) if return_entropy else logp


def token_entropy(logits, *, temperature=1.0, process_group=None, backend="auto"):
    """Entropy of softmax(logits / temperature) per position.

    Args:
        logits: [..., V] float32, float16 or bfloat16; any strides.
        process_group: the vocabulary split over a torch.distributed group, as for
            ``token_logprobs`` (one all-gather of 3 float32 per row in the forward).
    Returns:
        H [...] float32 = logsumexp(s) - sum_v p_v s_v, s = logits / T. Differentiable wrt
        ``logits``: dH/dz_v = -p_v (log p_v + H) / T.
    """
    op = "token_entropy"
    name = _backend.pick_kernel(op, backend, logits, "logits", KERNEL_DTYPES)
    if process_group is not None:
        _check_logits(op, "logits", logits)
        t = _check_temperature(op, temperature)
        shard = vp.vocab_shard(op, process_group, logits.shape[-1])
        if shard is not None:
            return vpo.token_entropy(logits, t, name, shard)
    if name in NATIVE:
        try:
            return _token_entropy_fwd(logits, temperature)[0]
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
    _check_logits(op, "logits", logits)
    temperature = _check_temperature(op, temperature)
    if name == "torch":
        return ref.token_entropy(logits.float(), temperature)
    from rlhf_kernels.triton import logprobs as tri
    return tri.token_entropy(_rows(logits), temperature)[0].reshape(logits.shape[:-1])


def full_kl(logits, ref_logits, *, temperature=1.0, process_group=None, backend="auto"):
    """KL(pi || pi_ref) over the whole vocabulary per position, in one pass over both tensors.

    Args:
        logits: [..., V] float32, float16 or bfloat16, the policy; any strides.
        ref_logits: [..., V], same shape, dtype and device: the reference policy (treated as a
            constant: no gradient flows to it).
        process_group: the vocabulary split over a torch.distributed group, as for
            ``token_logprobs``: both tensors are this rank's slice (one all-gather of 5 float32
            per row in the forward).
    Returns:
        KL [...] float32 = sum_v p_v (log p_v - log q_v), p = softmax(logits / T),
        q = softmax(ref_logits / T). Differentiable wrt ``logits``:
        dKL/dz_v = p_v (log p_v - log q_v - KL) / T.
    """
    op = "full_kl"
    name = _backend.pick_kernel(op, backend, logits, "logits", KERNEL_DTYPES)
    if name in NATIVE and process_group is None:
        try:
            return _full_kl_fwd(logits, ref_logits, temperature)[0]
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
    _check_logits(op, "logits", logits)
    v.tensor(op, "ref_logits", ref_logits, kind="float")
    if ref_logits.dtype != logits.dtype:
        raise TypeError("full_kl: `ref_logits` must have the dtype of `logits` (%s), got %s"
                        % (logits.dtype, ref_logits.dtype))
    v.same_shape(op, "logits", logits, "ref_logits", ref_logits)
    v.same_device(op, "logits", logits, ref_logits=ref_logits)
    temperature = _check_temperature(op, temperature)
    ref_logits = ref_logits.detach()
    if process_group is not None:
        shard = vp.vocab_shard(op, process_group, logits.shape[-1])
        if shard is not None:
            return vpo.full_kl(logits, ref_logits, temperature, name, shard)
        if name in NATIVE:
            return _full_kl_fwd(logits, ref_logits, temperature)[0]
    if name == "torch":
        return ref.full_kl(logits.float(), ref_logits.float(), temperature)
    from rlhf_kernels.triton import logprobs as tri
    return tri.full_kl(_rows(logits), _rows(ref_logits), temperature)[0].reshape(logits.shape[:-1])


def _vocab_parallel_logprobs(op, name, logits, labels, temperature, ignore_index, inplace_backward, validate,
                             process_group):
    """token_logprobs over a vocabulary split across ``process_group``: (logp, entropy), or None
    for a group of one (the caller runs the single-device op)."""
    _check_logits(op, "logits", logits)
    _check_labels(op, "logits", logits, labels, "V")
    temperature = _check_temperature(op, temperature)
    ignore_index = _check_ignore_index(op, ignore_index)
    shard = vp.vocab_shard(op, process_group, logits.shape[-1])
    if shard is None:
        return None
    if validate and not torch.compiler.is_compiling():
        _check_label_range(op, labels, shard.v_global, ignore_index)
    return vpo.token_logprobs(logits, labels, temperature, ignore_index, inplace_backward, name, shard)


def kl_penalty(logprobs, ref_logprobs, kind="k1", *, clamp=None, backend="auto"):
    """Per-token KL estimate from the log-probabilities of sampled tokens (elementwise).

    With log_r = logprobs - ref_logprobs (samples drawn from the policy):
        k1 = log_r,  k2 = log_r**2 / 2,  k3 = exp(-log_r) - 1 + log_r,  abs = |log_r|
    ``clamp=c`` clamps the estimate to [-c, c] (zero gradient where clamped).

    Args:
        logprobs, ref_logprobs: float tensors of one shape, on one device.
        backend: "auto", "cuda", "triton", "cpu" or "torch". The op is a few elementwise
            torch ops, the same on every backend; the argument is checked like every op's
            (an explicit backend that cannot serve the tensors raises BackendUnavailable).
    Returns:
        float32 tensor of that shape, differentiable wrt both inputs.
    """
    op = "kl_penalty"
    _backend.pick(backend, logprobs, op, "logprobs")
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


# ---- output shapes of the native ops and their Triton twins (rlhf_kernels/_signatures.py) ----

@shape("token_logprobs_fwd")
def _token_logprobs_shapes(logits, **_):
    return f32(logits, logits.shape[:-1]), f32(logits, logits.shape[:-1]), rows_f32(logits, 2)


@shape("token_entropy_fwd")
def _token_entropy_shapes(logits, **_):
    return f32(logits, logits.shape[:-1]), rows_f32(logits, 2)


@shape("full_kl_fwd")
def _full_kl_shapes(logits, **_):
    return f32(logits, logits.shape[:-1]), rows_f32(logits, 4)


@shape("logprobs_bwd", "full_kl_bwd")
def _logits_grad_shape(logits, **_):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@shape("logprobs_bwd_inplace")
def _no_outputs(**_):
    return None
