"""Fused LM head + token log-probabilities + entropy: torch matmuls, Triton epilogues.

The same tiling as the native ops (csrc/include/rlhf/linear_logprobs_op.h): the vocabulary in
tiles of ``vc`` columns, the tokens in blocks of ``nt`` rows; each tile's float32 logits [nt, vc]
come from one matmul (cuBLAS through torch, float32 output from 16-bit inputs) and a Triton
epilogue, one program per row, folds them at once, bias added, into running float32 statistics
of s = logits / T
(rlhf_kernels/triton/logprobs.py has the same online softmax):
    m = max s,  d = sum exp(s - m),  w = sum exp(s - m) (s - m),  s_y = the label's s.
Then logp = (s_y - m) - log d and H = log d - w / d. Saved for the backward: (m, log d) and H.
A label outside [0, V) other than ignore_index never sets s_y: NaN logp and entropy.
The backward recomputes each tile's logits, a second epilogue overwrites them with
    dlogits = [g_l (onehot(y) - p) - g_H p (log p + H)] / T
    (0 on ignored rows and rows whose label is outside [0, V))
in the operands' dtype, and torch matmuls accumulate d_hidden (float32), d_weight and d_bias
tile by tile.
The [N, V] logits never exist; at most one tile of them does.

Batch invariance, as in the native ops: nt and vc never depend on N, and every matmul sees a
whole [nt, H] block (the last one padded, and any block not starting on an aligned boundary
copied: _row_block), so a row's logp, entropy and d_hidden row are bitwise the same whatever
other rows share its batch; the cost is up to nt - 1 padded rows per call.
"""

import torch
import triton
import triton.language as tl

from rlhf_kernels.triton import _common
from rlhf_kernels.triton._op import DifferentiableOp, Op
from rlhf_kernels.triton.logprobs import fold, logprob_grad, row_grad_inputs

# Bytes of one float32 logits tile and token rows per block (the native CUDA op's values).
TILE_BYTES = 256 << 20
MAX_ROWS = 2048
_ALIGN = 128
_BLOCK_ALIGN = 64  # bytes: a row block starting elsewhere is copied (rlhf/linear_logprobs_op.h: kBlockAlign)


@triton.jit
def _fold_kernel(
    z_ptr,        # [nr, n] float32 logits tile (no bias), rows contiguous
    bias_ptr,     # [n] float32 bias of the tile's columns; read only when HAS_BIAS
    labels_ptr,   # [nr] int32/int64 labels (global vocabulary ids)
    run_ptr,      # [nr, 4] float32 running (m, d, w, s_y), updated in place
    n, c0, inv_t,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * n
    cols = tl.arange(0, BLOCK)
    m = tl.load(run_ptr + 4 * row)
    d = tl.load(run_ptr + 4 * row + 1)
    w = tl.load(run_ptr + 4 * row + 2)
    for start in range(0, n, BLOCK):
        idx = start + cols
        z = tl.load(base + idx, mask=idx < n, other=float("-inf"))
        if HAS_BIAS:
            z += tl.load(bias_ptr + idx, mask=idx < n, other=0.0)
        m, d, w = fold(m, d, w, z * inv_t)
    tl.store(run_ptr + 4 * row, m)
    tl.store(run_ptr + 4 * row + 1, d)
    tl.store(run_ptr + 4 * row + 2, w)
    y = tl.load(labels_ptr + row).to(tl.int64) - c0
    here = (y >= 0) & (y < n)
    z_y = tl.load(base + y, mask=here, other=0.0)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y, mask=here, other=0.0)
    s_y = z_y * inv_t
    tl.store(run_ptr + 4 * row + 3, s_y, mask=here)


@triton.jit
def _grad_kernel(
    z_ptr,        # [nr, n] float32 logits tile (no bias)
    dz_ptr,       # [nr, n] out: dlogits in the matmul operands' dtype; may be z_ptr (each chunk
                  # is read before it is written)
    bias_ptr,     # [n] float32 bias of the tile's columns; read only when HAS_BIAS
    labels_ptr,   # [nr] int labels (global vocabulary ids)
    glogp_ptr,    # [nr] float32 upstream gradient of logp; read only when HAS_GLOGP
    gent_ptr,     # [nr] float32 upstream gradient of the entropy; read only when HAS_GENT
    stats_ptr,    # [nr, 2] float32 saved (m, log d)
    ent_ptr,      # [nr] float32 saved entropy
    n, c0, V, inv_t, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * n
    out = dz_ptr + row * n
    cols = tl.arange(0, BLOCK)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = (label != ignore_index) & (label >= 0) & (label < V)  # no gradient for a label outside [0, V)
    y = label - c0
    gl, gh, m, log_d, h = row_grad_inputs(row, glogp_ptr, gent_ptr, stats_ptr, ent_ptr, HAS_GLOGP, HAS_GENT)
    for start in range(0, n, BLOCK):
        idx = start + cols
        inb = idx < n
        z = tl.load(base + idx, mask=inb, other=0.0)
        if HAS_BIAS:
            z += tl.load(bias_ptr + idx, mask=inb, other=0.0)
        ds = logprob_grad(z * inv_t, idx, y, m, log_d, h, gl, gh, inv_t, keep)
        tl.store(out + idx, ds.to(dz_ptr.dtype.element_ty), mask=inb)


def tiles(V, H, budget, max_rows=MAX_ROWS):
    """(vc, nt): vocabulary columns and token rows per tile, as the native ops choose them
    (linear_tiles): never from the number of tokens."""
    budget = max(budget, _ALIGN)
    nt = 1
    while nt * 2 <= min(max_rows, budget // _ALIGN):
        nt *= 2
    vc = budget // max(nt, H) // _ALIGN * _ALIGN or _ALIGN
    return min(vc, V), nt


def _row_block(h, pad, r0, nr, nt):
    """Rows [r0, r0 + nr) of h [N, H] as an [nt, H] matmul operand, and the padded block: h's own
    rows when they are a whole block on a _BLOCK_ALIGN-byte boundary, else a copy into the first
    nr rows of ``pad`` (zeroed when made; its other rows are multiplied and never written out)."""
    rows = h[r0:r0 + nr]
    if nr == nt and rows.data_ptr() % _BLOCK_ALIGN == 0:
        return rows, pad
    if pad is None:
        pad = h.new_zeros(nt, h.shape[1])
    pad[:nr] = rows
    return pad, pad


def _block(n):
    # the interpreter runs a program's chunk loop in numpy: small chunks exercise the merge
    return _common.block(n, 4096, 128)


def _operand(t):
    """Matmul operand: on a GPU the tensor itself (cuBLAS gives float32 output from 16-bit
    inputs); on the CPU (the interpreter, for tests) a float32 copy."""
    return t if t.is_cuda or t.dtype == torch.float32 else t.float()


def _mm_f32(a, b):
    """a @ b in float32, without rounding 16-bit products to 16 bits."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    return torch.mm(a, b, out_dtype=torch.float32)


def _tiling(hidden, weight, tile):
    budget = tile if tile > 0 else TILE_BYTES // 4
    return tiles(weight.shape[0], weight.shape[1], budget)


def _bias_f32(bias):
    return None if bias is None else bias.float().contiguous()


def _forward(hidden, weight, bias, y, temperature, ignore_index, tile):
    N, V = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    running = torch.zeros(N, 4, **f32)
    running[:, 0] = float("-inf")
    running[:, 3] = float("nan")  # s_y: a label outside [0, V) never sets it
    vc, nt = _tiling(hidden, weight, tile)
    inv_t = 1.0 / temperature
    h, b = _operand(hidden), _bias_f32(bias)
    pad = None
    for c0 in range(0, V, vc):
        n = min(vc, V - c0)
        block = _block(n)
        w_t = _operand(weight[c0:c0 + n]).t()
        for r0 in range(0, N, nt):
            nr = min(nt, N - r0)
            rows, pad = _row_block(h, pad, r0, nr, nt)
            logits = _mm_f32(rows, w_t)[:nr]
            _fold_kernel[(nr,)](logits, b[c0:c0 + n] if b is not None else logits, y[r0:r0 + nr],
                                running[r0:r0 + nr], n, c0, inv_t,
                                HAS_BIAS=b is not None, BLOCK=block, num_warps=_common.warps(block))
            del logits
    m, d = running[:, 0], running[:, 1]
    log_d = torch.log(d)
    ignored = y == ignore_index
    in_vocab = (y >= 0) & (y < V)
    logp = torch.where(ignored, 0.0, (running[:, 3] - m) - log_d)
    entropy = torch.where(ignored, 0.0, torch.where(in_vocab, log_d - running[:, 2] / d, float("nan")))
    return logp, entropy, torch.stack((m, log_d), 1)


def _backward(hidden, weight, bias, y, g_logp, g_entropy, stats, entropy, temperature, ignore_index, tile,
              need_h, need_w, need_b):
    """-> (d_hidden, d_weight, d_bias) in the inputs' dtype; an empty [0] tensor for each not asked for."""
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(N, H, **f32) if need_h else None
    d_weight = torch.empty_like(weight) if need_w else None
    d_bias = torch.zeros(V, **f32) if need_b else None
    if N == 0:
        if need_w:
            d_weight.zero_()
    else:
        vc, nt = _tiling(hidden, weight, tile)
        acc_w = need_w and nt < N  # several token blocks: a float32 accumulator per vocab tile
        inv_t = 1.0 / temperature
        h, b = _operand(hidden), _bias_f32(bias)
        pad = None
        for c0 in range(0, V, vc):
            n = min(vc, V - c0)
            block = _block(n)
            w = _operand(weight[c0:c0 + n])
            dw = torch.zeros(n, H, **f32) if acc_w else None
            for r0 in range(0, N, nt):
                nr = min(nt, N - r0)
                hr = h[r0:r0 + nr]
                rows, pad = _row_block(h, pad, r0, nr, nt)
                logits_block = _mm_f32(rows, w.t())
                # the block's dlogits [nt, n]: the kernel writes the first nr rows (the others are
                # the padding's, in products whose rows are never written out)
                dz_block = logits_block if h.dtype == torch.float32 else torch.empty(
                    logits_block.shape, dtype=h.dtype, device=h.device)
                logits, dz = logits_block[:nr], dz_block[:nr]
                _grad_kernel[(nr,)](
                    logits, dz, b[c0:c0 + n] if b is not None else logits, y[r0:r0 + nr],
                    g_logp[r0:r0 + nr] if g_logp is not None else entropy,
                    g_entropy[r0:r0 + nr] if g_entropy is not None else entropy,
                    stats[r0:r0 + nr], entropy[r0:r0 + nr], n, c0, V, inv_t, ignore_index,
                    HAS_BIAS=b is not None, HAS_GLOGP=g_logp is not None, HAS_GENT=g_entropy is not None,
                    BLOCK=block, num_warps=_common.warps(block))
                del logits, logits_block
                if need_h:
                    d_hidden[r0:r0 + nr] += _mm_f32(dz_block, w)[:nr]
                if need_w:
                    if acc_w:
                        dw += _mm_f32(dz.t(), hr)
                    else:
                        d_weight[c0:c0 + n] = torch.mm(dz.t(), hr)
                if need_b:
                    d_bias[c0:c0 + n] += dz.sum(0, dtype=torch.float32)
                del dz, dz_block
            if acc_w:
                d_weight[c0:c0 + n] = dw
    dt = hidden.dtype
    none = lambda: hidden.new_empty((0,))  # noqa: E731  (outputs must not alias one another)
    return (d_hidden.to(dt) if need_h else none(), d_weight if need_w else none(),
            d_bias.to(dt) if need_b else none())


def _f32(g):
    return None if g is None else g.float().contiguous()


# ---- the ops (rlhf_kernels/triton/_op.py). Inputs as rlhf_kernels/ops/linear_logprobs.py passes
# them: hidden [N, H], weight [V, H], bias [V] or None (one dtype, contiguous), y [N] int32/int64.
# Saved between forward and backward: the caller's hidden, weight and bias (no copies), the
# labels, the per-row statistics [N, 2] = (max, log sum exp(s - max)) and the entropy.

linear_backward = Op("linear_logprobs_bwd", _backward)


def _setup(ctx, inputs, output):
    hidden, weight, bias, y, temperature, ignore_index, tile = inputs
    _, entropy, stats = output
    ctx.save_for_backward(hidden, weight, bias, y, stats, entropy)
    ctx.args = (temperature, ignore_index, tile)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _grad(ctx, g_logp, g_entropy, _g_stats):
    hidden, weight, bias, y, stats, entropy = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[2]
    if (g_logp is None and g_entropy is None) or not (need_h or need_w or need_b):
        return (None,) * 7
    d_hidden, d_weight, d_bias = linear_backward(hidden, weight, bias, y, _f32(g_logp), _f32(g_entropy), stats,
                                                 entropy, *ctx.args, need_h, need_w, need_b)
    return (d_hidden if need_h else None, d_weight if need_w else None, d_bias if need_b else None,
            None, None, None, None)


# (hidden, weight, bias, y, temperature, ignore_index, tile) -> float32 (logp [N], entropy [N],
# stats [N, 2]), differentiable wrt hidden, weight and bias. ``tile``: logits elements per tile
# (0: TILE_BYTES worth).
linear_token_logprobs = DifferentiableOp("linear_logprobs_fwd", _forward, _setup, _grad, drop=("validate",))
