"""Token log-probabilities, entropy and full-vocabulary KL in Triton.

One program per row walks the vocabulary in chunks of BLOCK (any V: the last chunk is
masked), keeping the online-softmax statistics of s = z / T as scalars:
    m = max s,  d = sum exp(s - m),  w = sum exp(s - m) (s - m)
and rebasing them when a chunk raises the max. Then
    lse = m + log d,  logp_y = (s_y - m) - log d,  H = log d - w / d.
For KL(p || q) the reference logits r = ref_z / T get their own (m_r, d_r) and
w_kl = sum exp(s - m) (s - r):  KL = w_kl / d + (m_r - m) + (log d_r - log d).
Saved per row for the backward: (m, log d) ([m, log d, m_r, log d_r] for KL), not lse:
lp = (s - m) - log d stays accurate for logits near 1e4, where a float32 lse is off by ~5e-4.
Backward, with lp = log p and p = exp(lp):
    dz = [g_l ([j == y] - p) - g_H p (lp + H)] / T         (token_logprobs / token_entropy)
    dz = g p (lp - lq - KL) / T,  lq = (r - m_r) - log d_r  (full_kl)
Only per-row float32 statistics are saved between forward and backward. The math is
the same as csrc/include/rlhf/logprobs.h. A NaN in a row makes that row's outputs and
gradient NaN (the gradient's select tests p != 0, not p > 0); a label outside [0, V) other
than ignore_index gives NaN logp and entropy and a zero gradient row, never a wild read.

The ops are registered with torch.library (rlhf_kernels/triton/_op.py): torch.compile sees
``torch.ops.rlhf_kernels.triton_token_logprobs_fwd`` and the rest; eager calls go straight to
the Python functions. ``inplace_backward`` (eager only) writes the gradient over the logits.
"""

import torch
import triton
import triton.language as tl

from rlhf_kernels.triton import _common
from rlhf_kernels.triton._op import DifferentiableOp, Op


@triton.jit
def _rebase(m, d, w, m_new):
    # stats (d, w) relative to m -> relative to m_new >= m; d == 0 means nothing seen yet
    shift = m - m_new
    scale = tl.where(d > 0, tl.exp(shift), 0.0)
    return d * scale, tl.where(d > 0, scale * (w + shift * d), 0.0)


@triton.jit
def fold(m, d, w, s):
    # folds a block of scaled logits s (-inf where masked) into a row's online-softmax statistics:
    # m the running max, d = sum exp(s - m), w = sum exp(s - m) (s - m); -> the new (m, d, w)
    m_new = tl.maximum(m, tl.max(s, 0))
    d, w = _rebase(m, d, w, m_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exps are 0
    e = tl.exp(s - m_safe)
    return m_new, d + tl.sum(e, 0), w + tl.sum(tl.where(e > 0, e * (s - m_safe), 0.0), 0)


@triton.jit
def row_grad_inputs(row, glogp_ptr, gent_ptr, stats_ptr, ent_ptr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr):
    # a row's upstream gradients (0 when absent) and saved (m, log d, entropy)
    gl = 0.0
    if HAS_GLOGP:
        gl = tl.load(glogp_ptr + row)
    gh = 0.0
    if HAS_GENT:
        gh = tl.load(gent_ptr + row)
    return gl, gh, tl.load(stats_ptr + 2 * row), tl.load(stats_ptr + 2 * row + 1), tl.load(ent_ptr + row)


@triton.jit
def logprob_grad(s, idx, y, m, log_d, h, gl, gh, inv_t, keep):
    # dz of g_l * logp_y + g_H * H at the scaled logits s of columns idx; 0 unless keep
    lp = (s - m) - log_d
    p = tl.exp(lp)
    # 0 where p == 0 (a -inf logit: p * lp would be 0 * -inf); p != 0 rather than p > 0 so that
    # a NaN row (NaN lp and p) keeps a NaN gradient, as PyTorch's
    ds = tl.where(p != 0, -p * (gl + gh * (lp + h)), 0.0) + tl.where(idx == y, gl, 0.0)
    return tl.where(keep, ds * inv_t, 0.0)


@triton.jit
def _logprobs_fwd_kernel(
    z_ptr,        # [N, V] float32/float16/bfloat16 logits, rows contiguous
    labels_ptr,   # [N] int32/int64 labels; read only when HAS_LABELS
    logp_ptr,     # [N] float32 out: logp of the label (0 when ignored); written only when HAS_LABELS
    ent_ptr,      # [N] float32 out: entropy (0 when ignored)
    stats_ptr,    # [N, 2] float32 out: (m, log d), saved for the backward
    V, inv_t, ignore_index,
    HAS_LABELS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * V
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        s = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        m, d, w = fold(m, d, w, s)
    log_d = tl.log(d)
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_d)
    h = log_d - w / d
    if HAS_LABELS:
        y = tl.load(labels_ptr + row).to(tl.int64)
        valid = y != ignore_index
        # a label outside [0, V) (validate=False, or a CUDA graph) gives NaN, never a wild read
        in_range = (y >= 0) & (y < V)
        s_y = tl.load(base + y, mask=valid & in_range, other=0.0).to(tl.float32) * inv_t
        logp = tl.where(in_range, (s_y - m) - log_d, float("nan"))
        tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
        tl.store(ent_ptr + row, tl.where(valid, tl.where(in_range, h, float("nan")), 0.0))
    else:
        tl.store(ent_ptr + row, h)


@triton.jit
def _logprobs_bwd_kernel(
    z_ptr,        # [N, V] logits
    labels_ptr,   # [N] int labels; read only when HAS_LABELS
    glogp_ptr,    # [N] float32 upstream gradient of logp; read only when HAS_GLOGP
    gent_ptr,     # [N] float32 upstream gradient of the entropy; read only when HAS_GENT
    stats_ptr,    # [N, 2] float32 saved (m, log d)
    ent_ptr,      # [N] float32 saved entropy
    grad_ptr,     # [N, V] out, logits' dtype; may be z_ptr (each chunk is read before it is written)
    V, inv_t, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * V
    out = grad_ptr + row * V
    cols = tl.arange(0, BLOCK)
    keep = True
    y = -1
    if HAS_LABELS:
        y = tl.load(labels_ptr + row).to(tl.int64)
        keep = (y != ignore_index) & (y >= 0) & (y < V)
    gl, gh, m, log_d, h = row_grad_inputs(row, glogp_ptr, gent_ptr, stats_ptr, ent_ptr, HAS_GLOGP, HAS_GENT)
    for start in range(0, V, BLOCK):
        idx = start + cols
        inb = idx < V
        s = tl.load(base + idx, mask=inb, other=0.0).to(tl.float32) * inv_t
        ds = logprob_grad(s, idx, y, m, log_d, h, gl, gh, inv_t, keep)
        tl.store(out + idx, ds.to(grad_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _full_kl_fwd_kernel(
    z_ptr,        # [N, V] policy logits
    zr_ptr,       # [N, V] reference logits, same dtype
    kl_ptr,       # [N] float32 out: KL(p || q)
    stats_ptr,    # [N, 4] float32 out: (m, log d, m_r, log d_r)
    V, inv_t, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    mr = tl.full((), float("-inf"), tl.float32)
    dr = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        inb = idx < V
        s = tl.load(z_ptr + row * V + idx, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        r = tl.load(zr_ptr + row * V + idx, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(s, 0))
        mr_new = tl.maximum(mr, tl.max(r, 0))
        scale = tl.where(d > 0, tl.exp(m - m_new), 0.0)  # w has no shift term: (s - r) does not move with m
        d = d * scale
        w = w * scale
        dr = tl.where(dr > 0, dr * tl.exp(mr - mr_new), 0.0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        mr_safe = tl.where(mr_new == float("-inf"), 0.0, mr_new)
        e = tl.exp(s - m_safe)
        d += tl.sum(e, 0)
        w += tl.sum(tl.where(e > 0, e * (s - r), 0.0), 0)
        dr += tl.sum(tl.exp(r - mr_safe), 0)
        m = m_new
        mr = mr_new
    log_d = tl.log(d)
    log_dr = tl.log(dr)
    tl.store(kl_ptr + row, w / d + (mr - m) + (log_dr - log_d))
    tl.store(stats_ptr + 4 * row, m)
    tl.store(stats_ptr + 4 * row + 1, log_d)
    tl.store(stats_ptr + 4 * row + 2, mr)
    tl.store(stats_ptr + 4 * row + 3, log_dr)


@triton.jit
def _full_kl_bwd_kernel(
    z_ptr,        # [N, V] policy logits
    zr_ptr,       # [N, V] reference logits
    g_ptr,        # [N] float32 upstream gradient of KL
    kl_ptr,       # [N] float32 saved KL
    stats_ptr,    # [N, 4] float32 saved (m, log d, m_r, log d_r)
    grad_ptr,     # [N, V] out, logits' dtype
    V, inv_t, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    g = tl.load(g_ptr + row)
    kl = tl.load(kl_ptr + row)
    m = tl.load(stats_ptr + 4 * row)
    log_d = tl.load(stats_ptr + 4 * row + 1)
    mr = tl.load(stats_ptr + 4 * row + 2)
    log_dr = tl.load(stats_ptr + 4 * row + 3)
    for start in range(0, V, BLOCK):
        idx = start + cols
        inb = idx < V
        s = tl.load(z_ptr + row * V + idx, mask=inb, other=0.0).to(tl.float32) * inv_t
        r = tl.load(zr_ptr + row * V + idx, mask=inb, other=0.0).to(tl.float32) * inv_t
        lp = (s - m) - log_d
        p = tl.exp(lp)
        ds = tl.where(p != 0, g * p * (lp - ((r - mr) - log_dr) - kl), 0.0) * inv_t  # p != 0: NaN stays NaN
        tl.store(grad_ptr + row * V + idx, ds.to(grad_ptr.dtype.element_ty), mask=inb)


def _block(V):
    # the interpreter runs a program's chunk loop in numpy: small chunks exercise the online
    # merge across chunks at test sizes; on a GPU, 4096 entries per chunk
    return _common.block(V, 4096, 128)


def _f32(g):
    return None if g is None else g.float().contiguous()


def _forward(z, y, temperature, ignore_index):
    N, V = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    logp = torch.empty(N if y is not None else 0, **f32)
    entropy = torch.empty(N, **f32)
    stats = torch.empty(N, 2, **f32)
    if N > 0:
        block = _block(V)
        _logprobs_fwd_kernel[(N,)](
            z, y if y is not None else z, logp if y is not None else entropy, entropy, stats,
            V, 1.0 / temperature, ignore_index,
            HAS_LABELS=y is not None, BLOCK=block, num_warps=_common.warps(block),
        )
    return logp, entropy, stats


def _backward_into(grad, z, y, g_logp, g_entropy, stats, entropy, temperature, ignore_index):
    """The gradient into ``grad`` ([N, V], z's dtype; may be z itself)."""
    N, V = z.shape
    if N > 0:
        block = _block(V)
        _logprobs_bwd_kernel[(N,)](
            z, y if y is not None else entropy, g_logp if g_logp is not None else entropy,
            g_entropy if g_entropy is not None else entropy, stats, entropy, grad,
            V, 1.0 / temperature, ignore_index,
            HAS_LABELS=y is not None, HAS_GLOGP=g_logp is not None, HAS_GENT=g_entropy is not None,
            BLOCK=block, num_warps=_common.warps(block),
        )
    return grad


def _backward(z, y, g_logp, g_entropy, stats, entropy, temperature, ignore_index):
    return _backward_into(torch.empty_like(z), z, y, g_logp, g_entropy, stats, entropy, temperature, ignore_index)


def _full_kl_forward(z, zr, temperature):
    N, V = z.shape
    f32 = dict(dtype=torch.float32, device=z.device)
    kl, stats = torch.empty(N, **f32), torch.empty(N, 4, **f32)
    if N > 0:
        block = _block(V)
        _full_kl_fwd_kernel[(N,)](z, zr, kl, stats, V, 1.0 / temperature, BLOCK=block,
                                  num_warps=_common.warps(block))
    return kl, stats


def _full_kl_backward(g_kl, z, zr, kl, stats, temperature):
    N, V = z.shape
    grad = torch.empty_like(z)
    if N > 0:
        block = _block(V)
        _full_kl_bwd_kernel[(N,)](z, zr, g_kl, kl, stats, grad, V, 1.0 / temperature, BLOCK=block,
                                  num_warps=_common.warps(block))
    return grad


# ---- the ops (rlhf_kernels/triton/_op.py). Inputs as rlhf_kernels/ops/logprobs.py passes them:
# z, zr [N, V] contiguous float32/float16/bfloat16, y [N] int32/int64, upstream gradients
# float32 contiguous. Saved between forward and backward: the logits (no copy), the per-row
# statistics [N, 2] ([N, 4] for full_kl) and the entropy (or KL). Outputs float32 [N] and the
# statistics; gradients in the logits' dtype.

logprobs_backward = Op("logprobs_bwd", _backward)


def _token_logprobs_setup(ctx, inputs, output):
    z, y, temperature, ignore_index, inplace_backward = inputs
    _, entropy, stats = output
    ctx.save_for_backward(z, y, stats, entropy)
    ctx.args = (temperature, ignore_index, inplace_backward)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _token_logprobs_grad(ctx, g_logp, g_entropy, _g_stats):
    if g_logp is None and g_entropy is None:
        return (None,) * 5
    z, y, stats, entropy = ctx.saved_tensors
    temperature, ignore_index, inplace_backward = ctx.args
    args = (z, y, _f32(g_logp), _f32(g_entropy), stats, entropy, temperature, ignore_index)
    if inplace_backward:  # eager only: the public API passes False while torch.compile traces
        grad = _backward_into(z, *args)
    else:
        grad = logprobs_backward(*args)
    return grad, None, None, None, None


def _token_logprobs(z, y, temperature, ignore_index, inplace_backward):
    return _forward(z, y, temperature, ignore_index)


token_logprobs = DifferentiableOp("token_logprobs_fwd", _token_logprobs, _token_logprobs_setup, _token_logprobs_grad,
                                  drop=("validate",))


def _token_entropy_setup(ctx, inputs, output):
    z, temperature = inputs
    entropy, stats = output
    ctx.save_for_backward(z, stats, entropy)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _token_entropy_grad(ctx, g_entropy, _g_stats):
    if g_entropy is None:
        return None, None
    z, stats, entropy = ctx.saved_tensors
    return logprobs_backward(z, None, None, _f32(g_entropy), stats, entropy, ctx.temperature, 0), None


def _token_entropy(z, temperature):
    _, entropy, stats = _forward(z, None, temperature, 0)
    return entropy, stats


token_entropy = DifferentiableOp("token_entropy_fwd", _token_entropy, _token_entropy_setup, _token_entropy_grad)

full_kl_backward = Op("full_kl_bwd", _full_kl_backward)


def _full_kl_setup(ctx, inputs, output):
    z, zr, temperature = inputs
    kl, stats = output
    ctx.save_for_backward(z, zr, kl, stats)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _full_kl_grad(ctx, g_kl, _g_stats):
    if g_kl is None:
        return None, None, None
    z, zr, kl, stats = ctx.saved_tensors
    return full_kl_backward(_f32(g_kl), z, zr, kl, stats, ctx.temperature), None, None


full_kl = DifferentiableOp("full_kl_fwd", _full_kl_forward, _full_kl_setup, _full_kl_grad)
