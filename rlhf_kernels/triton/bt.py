"""Bradley-Terry and all-pairs ranking losses in Triton.

BT forward is one program summing fixed-size tiles in order (P is small: one launch, no
atomics); the backward is elementwise. Ranking: one program per prompt builds the K x K
pair matrix of a row, then one program combines the rows in order. The math mirrors
csrc/include/rlhf/bt.h:
    logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)),  sigmoid(x) stable for both signs
    bt:      l(d) = -(1-eps)*logsigmoid(d) - eps*logsigmoid(-d),  dl/dd = sigmoid(d) - (1-eps)
    ranking: l = -logsigmoid(r_i - r_j) for valid i < j,  dl/dr_i = -sigmoid(r_j - r_i)
"""

import torch
import triton
import triton.language as tl

from rlhf_kernels._layout import BT_STATS, RANKING_STATS
from rlhf_kernels.triton import _common
from rlhf_kernels.triton._op import DifferentiableOp, Op

# the statistics' order (rlhf_kernels/_layout.py, csrc/include/rlhf/layout.h), as kernel constants
S_ACCURACY = tl.constexpr(BT_STATS.index("accuracy"))
S_MARGIN_MEAN = tl.constexpr(BT_STATS.index("margin_mean"))
S_RANKING_ACCURACY = tl.constexpr(RANKING_STATS.index("accuracy"))


def _cap():
    return 256 if _common.INTERPRET else 1024


@triton.jit
def _log_sigmoid(x):
    # log1p(y), y = exp(-|x|) in (0, 1], without a log1p primitive: log(u) * y / (u - 1)
    # with u = 1 + y cancels the rounding of u (Goldberg), and is y itself when u rounds to 1.
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    log1p_y = tl.where(u == 1.0, y, tl.log(u) * y / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.minimum(x, 0.0) - log1p_y


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _bt_fwd_kernel(
    chosen_ptr,    # [P] float32
    rejected_ptr,  # [P] float32
    margin_ptr,    # [P] float32, read only when HAS_MARGIN
    loss_ptr,      # [] float32 out
    stats_ptr,     # [len(BT_STATS)] float32 out
    P, eps, center_coef,
    HAS_MARGIN: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    s_l = tl.zeros((BLOCK,), tl.float64)
    s_sq = tl.zeros((BLOCK,), tl.float64)
    s_acc = tl.zeros((BLOCK,), tl.float64)
    s_mar = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, P, BLOCK):
        i = start + offs
        inb = i < P
        c = tl.load(chosen_ptr + i, mask=inb, other=0.0)
        r = tl.load(rejected_ptr + i, mask=inb, other=0.0)
        diff = c - r
        d = diff
        if HAS_MARGIN:
            d = diff - tl.load(margin_ptr + i, mask=inb, other=0.0)
        l = -(1.0 - eps) * _log_sigmoid(d) - eps * _log_sigmoid(-d)
        s = (c + r).to(tl.float64)
        s_l += tl.where(inb, l, 0.0).to(tl.float64)
        s_sq += tl.where(inb, s * s, 0.0)
        s_acc += tl.where(inb & (c > r), 1.0, 0.0).to(tl.float64)
        s_mar += tl.where(inb, diff, 0.0).to(tl.float64)
    n = tl.maximum(P * 1.0, 1.0)
    loss = (tl.sum(s_l, 0) + center_coef * tl.sum(s_sq, 0)) / n
    tl.store(loss_ptr, loss.to(tl.float32))
    tl.store(stats_ptr + S_ACCURACY, (tl.sum(s_acc, 0) / n).to(tl.float32))
    tl.store(stats_ptr + S_MARGIN_MEAN, (tl.sum(s_mar, 0) / n).to(tl.float32))


@triton.jit
def _bt_bwd_kernel(
    grad_ptr,       # [] float32
    chosen_ptr, rejected_ptr, margin_ptr,  # [P] float32 (margin read only when HAS_MARGIN)
    d_chosen_ptr,   # [P] float32 out
    d_rejected_ptr, # [P] float32 out
    P, eps, center_coef,
    HAS_MARGIN: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = i < P
    c = tl.load(chosen_ptr + i, mask=inb, other=0.0)
    r = tl.load(rejected_ptr + i, mask=inb, other=0.0)
    d = c - r
    if HAS_MARGIN:
        d = d - tl.load(margin_ptr + i, mask=inb, other=0.0)
    gd = _sigmoid(d) - (1.0 - eps)
    gs = 2.0 * center_coef * (c + r)
    scale = tl.load(grad_ptr) / tl.maximum(P * 1.0, 1.0)
    tl.store(d_chosen_ptr + i, scale * (gd + gs), mask=inb)
    tl.store(d_rejected_ptr + i, scale * (gs - gd), mask=inb)


@triton.jit
def _ranking_rows_kernel(
    rewards_ptr,  # [P, K] float32
    valid_ptr,    # [P, K] int8, read only when HAS_VALID
    parts_ptr,    # [P, 3] float64 out: loss sum, pairs, correct pairs
    K,
    HAS_VALID: tl.constexpr, KB: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KB)
    inb = k < K
    ok = inb
    if HAS_VALID:
        ok = inb & (tl.load(valid_ptr + p * K + k, mask=inb, other=0) != 0)
    r = tl.load(rewards_ptr + p * K + k, mask=ok, other=0.0)
    d = r[:, None] - r[None, :]                              # r_i - r_j
    pair = ok[:, None] & ok[None, :] & (k[:, None] < k[None, :])
    l = tl.where(pair, -_log_sigmoid(d), 0.0).to(tl.float64)
    n = tl.where(pair, 1.0, 0.0).to(tl.float64)
    c = tl.where(pair & (d > 0), 1.0, 0.0).to(tl.float64)
    out = parts_ptr + p * 3
    tl.store(out, tl.sum(tl.sum(l, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(n, 1), 0))
    tl.store(out + 2, tl.sum(tl.sum(c, 1), 0))


@triton.jit
def _ranking_combine_kernel(
    parts_ptr,  # [P, 3] float64 row partials
    loss_ptr,   # [] float32 out
    stats_ptr,  # [len(RANKING_STATS)] float32 out
    scale_ptr,  # [P] float32 out: each prompt's weight 1 / (pairs * prompts with pairs)
    P,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    a_prompts = tl.zeros((BLOCK,), tl.float64)
    a_pairs = tl.zeros((BLOCK,), tl.float64)
    a_correct = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, P, BLOCK):
        i = start + offs
        inb = i < P
        n = tl.load(parts_ptr + i * 3 + 1, mask=inb, other=0.0)
        a_prompts += tl.where(n > 0, 1.0, 0.0)
        a_pairs += n
        a_correct += tl.load(parts_ptr + i * 3 + 2, mask=inb, other=0.0)
    prompts = tl.sum(a_prompts, 0)
    pairs = tl.sum(a_pairs, 0)
    a_loss = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, P, BLOCK):
        i = start + offs
        inb = i < P
        n = tl.load(parts_ptr + i * 3 + 1, mask=inb, other=0.0)
        w = tl.where(n > 0, 1.0 / tl.where(n > 0, n * prompts, 1.0), 0.0)
        a_loss += w * tl.load(parts_ptr + i * 3, mask=inb, other=0.0)
        tl.store(scale_ptr + i, w.to(tl.float32), mask=inb)
    tl.store(loss_ptr, tl.sum(a_loss, 0).to(tl.float32))
    accuracy = tl.where(pairs > 0, tl.sum(a_correct, 0) / tl.maximum(pairs, 1.0), 0.0)
    tl.store(stats_ptr + S_RANKING_ACCURACY, accuracy.to(tl.float32))


@triton.jit
def _ranking_bwd_kernel(
    grad_ptr,     # [] float32
    rewards_ptr,  # [P, K] float32
    valid_ptr,    # [P, K] int8, read only when HAS_VALID
    scale_ptr,    # [P] float32 prompt weights
    out_ptr,      # [P, K] float32 out: d rewards
    K,
    HAS_VALID: tl.constexpr, KB: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KB)
    inb = k < K
    ok = inb
    if HAS_VALID:
        ok = inb & (tl.load(valid_ptr + p * K + k, mask=inb, other=0) != 0)
    r = tl.load(rewards_ptr + p * K + k, mask=ok, other=0.0)
    both = ok[:, None] & ok[None, :]
    # row i, column j: the derivative wrt r_i of the pair {i, j}
    g = tl.where(k[:, None] < k[None, :], -_sigmoid(r[None, :] - r[:, None]), _sigmoid(r[:, None] - r[None, :]))
    g = tl.where(both & (k[:, None] != k[None, :]), g, 0.0)
    s = tl.load(grad_ptr) * tl.load(scale_ptr + p)
    tl.store(out_ptr + p * K + k, s * tl.sum(g, 1), mask=inb)


def _bt_forward(chosen, rejected, margin, eps, center_coef):
    P = chosen.shape[0]
    loss, stats = chosen.new_empty(()), chosen.new_empty((len(BT_STATS),))
    block = _common.block(P, 1024, 256, floor=16)
    _bt_fwd_kernel[(1,)](chosen, rejected, margin if margin is not None else chosen, loss, stats, P, eps,
                         center_coef, HAS_MARGIN=margin is not None, BLOCK=block)
    return loss, stats


def _bt_backward(grad, chosen, rejected, margin, eps, center_coef):
    P = chosen.shape[0]
    dc, dr = torch.empty_like(chosen), torch.empty_like(rejected)
    if P:
        block = _cap()
        _bt_bwd_kernel[(triton.cdiv(P, block),)](grad, chosen, rejected, margin if margin is not None else chosen,
                                                 dc, dr, P, eps, center_coef, HAS_MARGIN=margin is not None,
                                                 BLOCK=block)
    return dc, dr


def _ranking_forward(rewards, valid):
    P, K = rewards.shape
    loss, stats = rewards.new_empty(()), rewards.new_empty((len(RANKING_STATS),))
    scale = rewards.new_empty((P,))
    parts = torch.empty((max(P, 1), 3), dtype=torch.float64, device=rewards.device)
    if P and K:
        _ranking_rows_kernel[(P,)](rewards, valid.view(torch.int8) if valid is not None else rewards, parts, K,
                                   HAS_VALID=valid is not None, KB=max(16, triton.next_power_of_2(K)))
    elif P:
        parts.zero_()
    block = _common.block(P, 1024, 256, floor=16)
    _ranking_combine_kernel[(1,)](parts, loss, stats, scale, P, BLOCK=block)
    return loss, stats, scale


def _ranking_backward(grad, rewards, valid, scale):
    P, K = rewards.shape
    out = torch.empty_like(rewards)
    if P and K:
        _ranking_bwd_kernel[(P,)](grad, rewards, valid.view(torch.int8) if valid is not None else rewards, scale, out,
                                  K, HAS_VALID=valid is not None, KB=max(16, triton.next_power_of_2(K)))
    return out


# ---- the ops (rlhf_kernels/triton/_op.py): float32 contiguous inputs and bool masks, checked and
# converted by rlhf_kernels/ops/bt.py.

bt_backward = Op("bt_bwd", _bt_backward)


def _bt_setup(ctx, inputs, output):
    chosen, rejected, margin, eps, center_coef = inputs
    ctx.save_for_backward(chosen, rejected, margin)
    ctx.coefs = (eps, center_coef)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _bt_grad(ctx, grad_loss, grad_stats):
    if grad_loss is None:
        return (None,) * 5
    chosen, rejected, margin = ctx.saved_tensors
    dc, dr = bt_backward(grad_loss.float().contiguous(), chosen, rejected, margin, *ctx.coefs)
    return dc, dr, None, None, None


bt_forward = DifferentiableOp("bt_fwd", _bt_forward, _bt_setup, _bt_grad)

ranking_backward = Op("ranking_bwd", _ranking_backward)


def _ranking_setup(ctx, inputs, output):
    rewards, valid = inputs
    ctx.save_for_backward(rewards, valid, output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _ranking_grad(ctx, grad_loss, grad_stats, grad_scale):
    if grad_loss is None:
        return None, None
    rewards, valid, scale = ctx.saved_tensors
    return ranking_backward(grad_loss.float().contiguous(), rewards, valid, scale), None


ranking_forward = DifferentiableOp("ranking_fwd", _ranking_forward, _ranking_setup, _ranking_grad)
