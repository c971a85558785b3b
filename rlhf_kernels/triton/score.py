"""Absolute-score reward-model loss (regression, ordinal) in Triton.

One program walks the P responses in fixed-size tiles, in order (P is a batch of scored
responses: small; one launch, no atomics), writing each element's d pred and accumulating
float64 sums: the loss, the stats, and for ordinal each threshold's gradient (a [BLOCK, KB]
tile of one-hot contributions summed over the block each step). The backward only scales the
saved factors. The math mirrors csrc/include/rlhf/score.h:
    regression, e = pred - score:  l = 0.5 e^2,  dl/dpred = e
    ordinal, x = pred, lower = t_{y-1}, upper = t_y (a missing bound drops its terms):
        l = -logsigmoid(upper - x) - logsigmoid(x - lower) - log(-expm1(lower - upper))
        dl/dx = sigmoid(x - upper) - sigmoid(lower - x)
        dl/dupper = -sigmoid(x - upper) - 1/expm1(upper - lower),  dl/dlower = sigmoid(lower - x) + 1/expm1(upper - lower)
"""

import triton
import triton.language as tl

from rlhf_kernels._layout import N_SCORE_STATS, SCORE_KINDS, SCORE_STATS
from rlhf_kernels.triton import _common
from rlhf_kernels.triton._op import DifferentiableOp
from rlhf_kernels.triton.bt import _log_sigmoid, _sigmoid

ORDINAL = SCORE_KINDS.index("ordinal")
# the stats' order (rlhf_kernels/_layout.py SCORE_STATS, csrc/include/rlhf/layout.h), as kernel constants
S_FIRST = tl.constexpr(SCORE_STATS["regression"].index("mse"))  # mse (regression) or accuracy (ordinal)
S_MAE = tl.constexpr(SCORE_STATS["regression"].index("mae"))
S_PRED_MEAN = tl.constexpr(SCORE_STATS["regression"].index("pred_mean"))
S_PRED_STD = tl.constexpr(SCORE_STATS["regression"].index("pred_std"))


@triton.jit
def _expm1(x):
    # exp(x) - 1 without an expm1 primitive: (u - 1) * x / log(u) with u = exp(x) cancels the
    # rounding of u (Kahan); x itself when u rounds to 1, -1 when u - 1 does, inf when u overflows.
    u = tl.exp(x)
    um1 = u - 1.0
    safe_log = tl.where((u == 1.0) | (um1 == -1.0) | (u == float("inf")), 1.0, tl.log(u))
    r = tl.where(u == float("inf"), u, um1 * x / safe_log)
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, r))


@triton.jit
def _ordinal_nll(x, lower, upper, has_lower, has_upper):
    l = tl.where(has_upper, -_log_sigmoid(upper - x), 0.0)
    l += tl.where(has_lower, -_log_sigmoid(x - lower), 0.0)
    gap_term = -tl.log(-_expm1(lower - upper))
    return l + tl.where(has_lower & has_upper, gap_term, 0.0)


@triton.jit
def _score_fwd_kernel(
    pred_ptr,    # [P] float32
    score_ptr,   # [P] float32 target (regression) or int32/int64 level (ordinal)
    t_ptr,       # [K-1] float32 thresholds, read only when ORDINAL
    loss_ptr,    # [] float32 out
    stats_ptr,   # [N_SCORE_STATS] float32 out
    dpred_ptr,   # [P] float32 out: d loss / d pred
    dt_ptr,      # [K-1] float32 out: d loss / d thresholds, written only when ORDINAL
    P, K,
    ORDINAL_KIND: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    kk = tl.arange(0, KB)
    n = tl.maximum(P * 1.0, 1.0)
    inv_n = (1.0 / n).to(tl.float32)
    s_loss = tl.zeros((BLOCK,), tl.float64)
    s_first = tl.zeros((BLOCK,), tl.float64)
    s_abs = tl.zeros((BLOCK,), tl.float64)
    s_x = tl.zeros((BLOCK,), tl.float64)
    s_x2 = tl.zeros((BLOCK,), tl.float64)
    s_t = tl.zeros((KB,), tl.float64)
    for start in range(0, P, BLOCK):
        i = start + offs
        inb = i < P
        x = tl.load(pred_ptr + i, mask=inb, other=0.0)
        xd = x.to(tl.float64)
        s_x += xd
        s_x2 += xd * xd
        if ORDINAL_KIND:
            y = tl.load(score_ptr + i, mask=inb, other=0).to(tl.int64)
            ok = inb & (y >= 0) & (y < K)
            has_lower = ok & (y > 0)
            has_upper = ok & (y < K - 1)
            lower = tl.load(t_ptr + y - 1, mask=has_lower, other=0.0)
            upper = tl.load(t_ptr + y, mask=has_upper, other=0.0)
            nll = _ordinal_nll(x, lower, upper, has_lower, has_upper)
            s_loss += tl.where(ok, nll, tl.where(inb, float("nan"), 0.0)).to(tl.float64)
            inv_gap = tl.where(has_lower & has_upper, 1.0 / _expm1(upper - lower), 0.0)
            su = _sigmoid(x - upper)
            sl = _sigmoid(lower - x)
            g_pred = tl.where(has_upper, su, 0.0) - tl.where(has_lower, sl, 0.0)
            g_upper = tl.where(has_upper, -su - inv_gap, 0.0)
            g_lower = tl.where(has_lower, sl + inv_gap, 0.0)
            tl.store(dpred_ptr + i, g_pred * inv_n, mask=inb)
            contrib = tl.where(kk[None, :] == y[:, None], g_upper[:, None], 0.0) + \
                tl.where(kk[None, :] == y[:, None] - 1, g_lower[:, None], 0.0)
            s_t += tl.sum(contrib.to(tl.float64), 0)
            # the most likely level (the lowest on a tie) and E[level] = sum_k sigmoid(x - t_k)
            best = tl.zeros((BLOCK,), tl.float32)
            guess = tl.zeros((BLOCK,), tl.int64)
            expected = tl.zeros((BLOCK,), tl.float32)
            for k in range(0, K):
                lo = tl.load(t_ptr + k - 1, mask=k > 0, other=0.0)
                hi = tl.load(t_ptr + k, mask=k < K - 1, other=0.0)
                logp = -_ordinal_nll(x, lo, hi, k > 0, k < K - 1)
                take = (k == 0) | (logp > best)
                best = tl.where(take, logp, best)
                guess = tl.where(take, k, guess)
                expected += tl.where(k < K - 1, _sigmoid(x - hi), 0.0)
            s_first += tl.where(inb & (guess == y), 1.0, 0.0).to(tl.float64)
            s_abs += tl.where(inb, tl.abs(expected.to(tl.float64) - y.to(tl.float64)), 0.0)
        else:
            e = x - tl.load(score_ptr + i, mask=inb, other=0.0)
            ed = e.to(tl.float64)
            s_loss += 0.5 * ed * ed
            s_first += ed * ed
            s_abs += tl.abs(ed)
            tl.store(dpred_ptr + i, e * inv_n, mask=inb)
    mean = tl.sum(s_x, 0) / n
    var = tl.maximum(tl.sum(s_x2, 0) / n - mean * mean, 0.0)
    tl.store(loss_ptr, (tl.sum(s_loss, 0) / n).to(tl.float32))
    tl.store(stats_ptr + S_FIRST, (tl.sum(s_first, 0) / n).to(tl.float32))
    tl.store(stats_ptr + S_MAE, (tl.sum(s_abs, 0) / n).to(tl.float32))
    tl.store(stats_ptr + S_PRED_MEAN, mean.to(tl.float32))
    tl.store(stats_ptr + S_PRED_STD, tl.sqrt(var).to(tl.float32))
    if ORDINAL_KIND:
        tl.store(dt_ptr + kk, (s_t / n).to(tl.float32), mask=kk < K - 1)


def _score_forward(pred, score, thresholds, kind):
    P = pred.shape[0]
    ordinal = kind == ORDINAL
    K = thresholds.shape[0] + 1 if ordinal else 1
    loss, stats = pred.new_empty(()), pred.new_empty((N_SCORE_STATS,))
    d_pred = pred.new_empty((P,))
    d_t = pred.new_empty((K - 1 if ordinal else 0,))
    KB = max(16, triton.next_power_of_2(max(K - 1, 1)))
    # the one-hot threshold tile is [BLOCK, KB]: keep it at most 8192 elements on a GPU
    block = _common.block(P, max(16, min(1024, 8192 // KB)) if ordinal else 1024, 64 if ordinal else 256, floor=16)
    # 8 warps for the largest ordinal tiles: at 4 warps [512, 16] takes all 255 registers on sm_90
    # (benchmarks/static_sm90.py)
    warps = 8 if ordinal and block * KB >= 4096 else 4
    _score_fwd_kernel[(1,)](pred, score, thresholds if ordinal else pred, loss, stats, d_pred,
                            d_t if ordinal else pred, P, K, ORDINAL_KIND=ordinal, BLOCK=block, KB=KB,
                            num_warps=warps)
    return loss, stats, d_pred, d_t


def _score_setup(ctx, inputs, output):
    ctx.has_thresholds = inputs[2] is not None
    ctx.save_for_backward(output[2], output[3])
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    ctx.set_materialize_grads(False)


def _score_grad(ctx, grad_loss, *grad_rest):
    if grad_loss is None:
        return None, None, None, None
    d_pred, d_t = ctx.saved_tensors
    return d_pred * grad_loss, None, (d_t * grad_loss if ctx.has_thresholds else None), None


# the op (rlhf_kernels/triton/_op.py): pred float32 contiguous, score float32 (regression) or
# int32/int64 levels (ordinal), thresholds float32 or None, checked and converted by
# rlhf_kernels/ops/score.py (validate too); kind is the SCORE_KINDS code
score_forward = DifferentiableOp("score_fwd", _score_forward, _score_setup, _score_grad, drop=("validate",))
