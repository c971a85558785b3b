"""PPO policy and value losses in Triton, on the CUDA path's design (csrc/cuda/ppo.cu).

Forward, one launch per loss of max(B, 1) programs: program b stores row b's float64
partials in `parts`, then draws a ticket (_last_to_arrive); the one that draws the last
combines all rows in a fixed order and writes the loss, the statistics and row_scale. The
ticket counter is made and zeroed per call with the partials (_scratch says why a cached one
is unsafe). The interpreter (TRITON_INTERPRET=1, used by the tests) runs programs one after
another, so it checks the logic, not the memory ordering (_last_to_arrive, _load_parts);
that is checked on a GPU.
Backward, one elementwise launch: d_x[b, t] = grad * row_scale[b] * dl/dx[b, t]. The
per-token math mirrors csrc/include/rlhf/ppo.h; the policy loss's options are constexpr
flags (_policy_flags), so the plain loss (options = 0) compiles to the code it had before them.
"""

import functools

import torch
import triton
import triton.language as tl

from rlhf_kernels._layout import (LOSS_AGGS, OPTION_BITS, POLICY_OPTIONS, POLICY_PARTS, POLICY_STATS, VALUE_PARTS,
                                  VALUE_STATS)
from rlhf_kernels.triton import _common
from rlhf_kernels.triton._op import DifferentiableOp, Op


def _index(names, name):
    return tl.constexpr(names.index(name))


# the layouts of rlhf_kernels/_layout.py (csrc/include/rlhf/layout.h), as kernel constants
N_POLICY_PARTS = tl.constexpr(len(POLICY_PARTS))
N_VALUE_PARTS = tl.constexpr(len(VALUE_PARTS))
PP_LOSS, PP_COUNT, PP_LOW, PP_HIGH, PP_DUAL, PP_KL, PP_RATIO, PP_MIN, PP_MAX = (
    _index(POLICY_PARTS, n) for n in ("loss", "count", "low", "high", "dual", "kl", "ratio", "ratio_min", "ratio_max"))
PP_ROW_GRAD, PP_IS_WEIGHT, PP_IS_CAPPED = (_index(POLICY_PARTS, n) for n in ("row_grad", "is_weight", "is_capped"))
VP_LOSS, VP_COUNT, VP_CLIPPED, VP_MEAN_R, VP_M2_R, VP_MEAN_E, VP_M2_E = (
    _index(VALUE_PARTS, n) for n in ("loss", "count", "clipped", "mean_r", "m2_r", "mean_err", "m2_err"))
S_CLIPFRAC, S_LOW, S_HIGH, S_DUAL, S_KL, S_RATIO, S_MIN, S_MAX, S_SEQ_CLIPFRAC, S_IS_WEIGHT_MEAN, S_IS_CAPPED_FRAC = (
    _index(POLICY_STATS, n) for n in ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                                      "ratio_mean", "ratio_min", "ratio_max", "seq_clipfrac", "is_weight_mean",
                                      "is_capped_frac"))
S_VF_CLIPFRAC, S_EXPLAINED_VAR = (_index(VALUE_STATS, n) for n in ("vf_clipfrac", "explained_var"))
AGG_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_SEQ_MEAN_TOKEN_SUM_NORM, AGG_TOKEN_SUM = (
    _index(LOSS_AGGS, n) for n in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                   "seq-mean-token-sum-norm", "token-sum"))
IS_NONE, IS_MASK = (_index(dict(POLICY_OPTIONS)["is_correction"], n) for n in ("none", "mis"))
# the kernels make and store the partials and statistics in these orders
assert [k.value for k in (PP_LOSS, PP_COUNT, PP_LOW, PP_HIGH, PP_DUAL, PP_KL, PP_RATIO, PP_MIN, PP_MAX, PP_ROW_GRAD,
                          PP_IS_WEIGHT, PP_IS_CAPPED)] == list(range(len(POLICY_PARTS)))
assert [k.value for k in (VP_LOSS, VP_COUNT, VP_CLIPPED, VP_MEAN_R, VP_M2_R, VP_MEAN_E, VP_M2_E)] == list(range(7))
assert [k.value for k in (S_CLIPFRAC, S_LOW, S_HIGH, S_DUAL, S_KL, S_RATIO, S_MIN, S_MAX, S_SEQ_CLIPFRAC,
                          S_IS_WEIGHT_MEAN, S_IS_CAPPED_FRAC)] == list(range(len(POLICY_STATS)))


# Launch settings of the forwards. The row pass keeps 10-12 float64 accumulators per
# element of its block and the combine 13, so the register count follows elements per thread:
# compiled for sm_90, _policy_fwd_kernel at BLOCK = COMBINE_BLOCK = 1024 with 4 warps took 255
# registers and an 8-byte stack (spilled). The combine tiles B in a fixed block (masked: it runs
# once, in one program) instead of one growing with B, and BLOCK = 1024 takes 8 warps: no
# forward spills at any block it is launched with (benchmarks/static_sm90.py checks every one).
COMBINE_BLOCK = 64 if _common.INTERPRET else 256


def _fwd_warps(block):
    return 8 if block >= 1024 else 4


@functools.lru_cache(maxsize=None)
def _policy_flags(options):
    """The kernels' constexpr flags for `options` (checked by rlhf_kernels/ops/ppo.py)."""
    o = {field: names[(options >> (OPTION_BITS * i)) & ((1 << OPTION_BITS) - 1)]
         for i, (field, names) in enumerate(POLICY_OPTIONS)}
    is_mode = dict(POLICY_OPTIONS)["is_correction"].index(o["is_correction"])
    seq_ratio = o["ratio_level"] == "sequence"
    row_is = is_mode != IS_NONE.value and o["is_level"] not in ("none", "token")
    return dict(SEQ_RATIO=seq_ratio,                               # every token uses its row's ratio s
                SEQ_GRAD=seq_ratio and o["objective"] != "cispo",  # the gradient is the row's (row_grad)
                CISPO=o["objective"] == "cispo",
                IS_MODE=is_mode,                                   # the is_correction code: IS_NONE, tis or IS_MASK
                TOKEN_IS=is_mode != IS_NONE.value and not row_is,  # a weight per token
                ROW_IS=row_is,                                     # one weight per row
                IS_GEOMETRIC=o["is_level"] == "geometric",
                ROW_SUMS=seq_ratio or row_is,
                PLAIN=options == 0)


@triton.jit
def _ppo_clip(ratio, dratio, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr):
    # PPO's clipped loss at `ratio` and dl/dx for dratio = d ratio / dx (ppo_clip in rlhf/ppo.h)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    l = tl.maximum(unclipped, clipped)
    dx = tl.where(unclipped >= clipped, -adv * dratio, 0.0)
    clip_wins = clipped > unclipped
    is_low = clip_wins & (ratio < lo)
    is_high = clip_wins & (ratio > hi)
    is_dual = adv != adv  # all false
    if HAS_DUAL:
        cap = -adv * dual_clip
        is_dual = (adv < 0.0) & (cap < l)
        l = tl.where(is_dual, cap, l)
        dx = tl.where(is_dual, 0.0, dx)
    return l, dx, is_low, is_high, is_dual


@triton.jit
def _is_weight(log_w, is_cap, IS_MODE: tl.constexpr):
    # (applied weight, w > cap) of w = exp(log_w): min(w, cap) (tis), w or 0 above cap (IS_MASK)
    w = tl.exp(log_w)
    return tl.where(w > is_cap, 0.0 if IS_MODE == IS_MASK else is_cap, w), w > is_cap


@triton.jit
def _policy_token(logp, old_logp, adv, rollout, row_ratio, row_log_w, clip_low, clip_high, dual_clip, is_cap,
                  HAS_DUAL: tl.constexpr, SEQ_RATIO: tl.constexpr, CISPO: tl.constexpr, IS_MODE: tl.constexpr,
                  TOKEN_IS: tl.constexpr):
    # policy_token in rlhf/ppo.h: the token's values of the partials, in POLICY_PARTS' order: c*l, 1, is_low,
    # is_high, is_dual, k3 of the token's own ratio, the ratio used (three times: sum, min, max), d(c*l)/dlogp
    # (d/ds for the PPO loss with SEQ_RATIO), the applied weight c and whether w was capped
    log_ratio = logp - old_logp
    own = tl.exp(log_ratio)
    ratio = own
    dratio = own
    if SEQ_RATIO:
        ratio = row_ratio + tl.zeros_like(own)
        dratio = 1.0
    if CISPO:  # l = -sg(clip(ratio)) * A * logp (cispo_clip in rlhf/ppo.h)
        dlogp = -tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high) * adv
        l = dlogp * logp
        is_low = ratio < 1.0 - clip_low
        is_high = ratio > 1.0 + clip_high
        is_dual = adv != adv  # all false
    else:
        l, dlogp, is_low, is_high, is_dual = _ppo_clip(ratio, dratio, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
    kl = (own - 1.0) - log_ratio
    one = tl.full(own.shape, 1.0, tl.float32)
    c = one
    capped = adv != adv  # all false
    if IS_MODE != IS_NONE:
        c, capped = _is_weight(old_logp - rollout if TOKEN_IS else row_log_w + tl.zeros_like(own), is_cap, IS_MODE)
        l = c * l
        dlogp = c * dlogp
    return (l, one, tl.where(is_low, 1.0, 0.0), tl.where(is_high, 1.0, 0.0), tl.where(is_dual, 1.0, 0.0), kl, ratio,
            ratio, ratio, dlogp, c, tl.where(capped, 1.0, 0.0))


# Partials as tuples of per-lane accumulators, one per column (the column k of a tuple is its
# k-th element): float64 sums, except the ratio's extremes (columns MIN_K and MAX_K, -1: none),
# min and max. Loops over the columns unroll at compile time (tl.static_range): one scalar
# accumulator per column as before, never a [BLOCK, N] tile (which spilled for sm_90).
@triton.jit
def _parts_init(N: tl.constexpr, MIN_K: tl.constexpr, MAX_K: tl.constexpr, EXT: tl.constexpr, BLOCK: tl.constexpr):
    # N columns of identities; the extremes in dtype EXT
    acc = ()
    for k in tl.static_range(N):
        if k == MIN_K:
            acc = acc + (tl.full((BLOCK,), float("inf"), EXT),)
        elif k == MAX_K:
            acc = acc + (tl.full((BLOCK,), -float("inf"), EXT),)
        else:
            acc = acc + (tl.zeros((BLOCK,), tl.float64),)
    return acc


@triton.jit
def _parts_fold(acc, x, valid, MIN_K: tl.constexpr, MAX_K: tl.constexpr):
    # acc with the lanes of x where valid folded in (x may have more columns than acc)
    res = ()
    for k in tl.static_range(len(acc)):
        if k == MIN_K:
            res = res + (tl.minimum(acc[k], tl.where(valid, x[k], float("inf"))),)
        elif k == MAX_K:
            res = res + (tl.maximum(acc[k], tl.where(valid, x[k], -float("inf"))),)
        else:
            res = res + (acc[k] + tl.where(valid, x[k], 0.0).to(tl.float64),)
    return res


@triton.jit
def _parts_total(acc, MIN_K: tl.constexpr, MAX_K: tl.constexpr):
    # each column over its lanes, as a float64 scalar
    res = ()
    for k in tl.static_range(len(acc)):
        if k == MIN_K:
            res = res + (tl.min(acc[k], 0).to(tl.float64),)
        elif k == MAX_K:
            res = res + (tl.max(acc[k], 0).to(tl.float64),)
        else:
            res = res + (tl.sum(acc[k], 0),)
    return res


@triton.jit
def _load_parts(p, inb, N: tl.constexpr):
    # columns 0..N-1 of the rows' partials at p (0 outside inb), written by other programs: loaded
    # with .cg (from L2, not the incoherent L1)
    x = ()
    for k in tl.static_range(N):
        x = x + (tl.load(p + k, mask=inb, other=0.0, cache_modifier=".cg"),)
    return x


@triton.jit
def _tile(mask_ptr, row, T, t):
    # (flat index, in bounds, valid) of row `row`'s tokens t
    inb = t < T
    idx = row * T + t
    return idx, inb, inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)


@triton.jit
def _loads(ptrs, idx, valid):
    # the [B, T] inputs at the pointers `ptrs` (a tuple) over a tile, 0 where not valid; a load whose
    # value goes unused (the rollout without TOKEN_IS) is removed by the compiler
    x = ()
    for k in tl.static_range(len(ptrs)):
        x = x + (tl.load(ptrs[k] + idx, mask=valid, other=0.0),)
    return x


@triton.jit
def _policy_row(logp_ptr, old_ptr, adv_ptr, roll_ptr, mask_ptr, parts_ptr, row, T, clip_low, clip_high, dual_clip,
                is_cap, HAS_DUAL: tl.constexpr, SEQ_RATIO: tl.constexpr, SEQ_GRAD: tl.constexpr, CISPO: tl.constexpr,
                IS_MODE: tl.constexpr, TOKEN_IS: tl.constexpr, ROW_IS: tl.constexpr, IS_GEOMETRIC: tl.constexpr,
                ROW_SUMS: tl.constexpr, PLAIN: tl.constexpr, BLOCK: tl.constexpr):
    # stores row `row`'s partials in parts_ptr[row, :] (arguments as _policy_fwd_kernel)
    row_ratio = 1.0
    row_log_w = 0.0
    if ROW_SUMS:  # float64 sums over the row's valid tokens of logp - old_logp, of old_logp - rollout, and 1
        acc = _parts_init(3, -1, -1, tl.float64, BLOCK)
        for start in range(0, T, BLOCK):
            idx, _, valid = _tile(mask_ptr, row, T, start + tl.arange(0, BLOCK))
            logp, old, roll = _loads((logp_ptr, old_ptr, roll_ptr), idx, valid)
            lw = tl.zeros_like(old).to(tl.float64)
            if ROW_IS:
                lw = old.to(tl.float64) - roll.to(tl.float64)
            x = (logp.to(tl.float64) - old.to(tl.float64), lw, tl.full((BLOCK,), 1.0, tl.float64))
            acc = _parts_fold(acc, x, valid, -1, -1)
        sum_lr, sum_lw, n = _parts_total(acc, -1, -1)
        row_ratio = tl.exp((sum_lr / tl.maximum(n, 1.0)).to(tl.float32))
        row_log_w = (sum_lw / tl.maximum(n, 1.0) if IS_GEOMETRIC else sum_lw).to(tl.float32)
    # the plain loss sums the columns up to ratio_max only; else the row_grad column sums d(c*l)/ds
    acc = _parts_init(PP_ROW_GRAD if PLAIN else N_POLICY_PARTS, PP_MIN, PP_MAX, tl.float32, BLOCK)
    for start in range(0, T, BLOCK):
        idx, _, valid = _tile(mask_ptr, row, T, start + tl.arange(0, BLOCK))
        logp, old, adv, roll = _loads((logp_ptr, old_ptr, adv_ptr, roll_ptr), idx, valid)
        x = _policy_token(logp, old, adv, roll, row_ratio, row_log_w, clip_low, clip_high, dual_clip, is_cap, HAS_DUAL,
                          SEQ_RATIO, CISPO, IS_MODE, TOKEN_IS)
        acc = _parts_fold(acc, x, valid, PP_MIN, PP_MAX)
    t = _parts_total(acc, PP_MIN, PP_MAX)
    count = t[PP_COUNT]
    g = count * 0.0 + 1.0  # the row's factor in the gradient (row_grad_factor in rlhf/ppo.h)
    if SEQ_GRAD:
        g = row_ratio.to(tl.float64) / tl.maximum(count, 1.0) * t[PP_ROW_GRAD]
    else:
        if ROW_IS:
            g = _is_weight(row_log_w, is_cap, IS_MODE)[0].to(tl.float64) + count * 0.0
        if SEQ_RATIO:
            g *= tl.minimum(tl.maximum(row_ratio, 1.0 - clip_low), 1.0 + clip_high).to(tl.float64)
    if PLAIN:  # is_weight (1 a token) and is_capped were not summed
        t = t + (g, count, count * 0.0)
    else:
        t = t[:PP_ROW_GRAD] + (g,) + t[PP_ROW_GRAD + 1:]
    for k in tl.static_range(N_POLICY_PARTS):
        tl.store(parts_ptr + row * N_POLICY_PARTS + k, t[k])


@triton.jit
def _last_to_arrive(parts_ptr, N_PARTS: tl.constexpr):
    # True in the one program that draws the last ticket, from the int32 counter that follows
    # the partials in the scratch (_scratch). The barrier orders the stores of
    # all threads of this program before the (single-thread) atomic, whose release half
    # publishes them; its acquire half, in the last program, orders the combine's loads
    # after every other program's ticket (Triton broadcasts a scalar atomic's result
    # through shared memory behind a barrier, which extends this to all threads).
    counter_ptr = (parts_ptr + tl.num_programs(0).to(tl.int64) * N_PARTS).to(tl.pointer_type(tl.int32))
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == tl.num_programs(0) - 1


@triton.jit
def _weigh_rows(parts_ptr, N_PARTS: tl.constexpr, GRAD_K: tl.constexpr, num_tokens_ptr, loss_ptr, scale_ptr, B,
                numel, total, rows_with, AGG: tl.constexpr, HAS_NT: tl.constexpr, BLOCK: tl.constexpr):
    # the loss sum_b w_b * loss_b, and row_scale[b] = w_b times column GRAD_K (the row's factor in
    # the gradient; -1: none); loss and count are the same columns in both losses' partials. w_b is
    # the weight of each token of row b in the aggregated loss (ppo_row_weight in rlhf/ppo.h)
    if HAS_NT:
        total = tl.load(num_tokens_ptr)
    a_loss = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        x = _load_parts(parts_ptr + b * N_PARTS, b < B, N_PARTS)
        count = x[PP_COUNT]
        if AGG == AGG_TOKEN_MEAN:
            denom = total + count * 0.0
        elif AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
            denom = count * rows_with
        elif AGG == AGG_SEQ_MEAN_TOKEN_SUM:
            denom = rows_with + count * 0.0
        elif AGG == AGG_SEQ_MEAN_TOKEN_SUM_NORM:
            denom = numel + count * 0.0
        else:  # AGG_TOKEN_SUM
            denom = count * 0.0 + 1.0
        w = tl.where(count > 0, 1.0 / tl.where(count > 0, denom, 1.0), 0.0)
        a_loss += w * x[PP_LOSS]
        if GRAD_K >= 0:
            w = w * x[GRAD_K]
        tl.store(scale_ptr + b, w.to(tl.float32), mask=b < B)
    tl.store(loss_ptr, tl.sum(a_loss, 0).to(tl.float32))


@triton.jit
def _policy_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel,
                    AGG: tl.constexpr, HAS_NT: tl.constexpr, BLOCK: tl.constexpr):
    # run by the last program only: every column over rows, the rows with a valid token and the rows
    # with a clipped one; then the statistics, in POLICY_STATS' order (policy_stats in rlhf/ppo.h): means
    # over valid tokens (0 without any), and the fraction of rows with a valid token that clip one
    acc = _parts_init(N_POLICY_PARTS + 2, PP_MIN, PP_MAX, tl.float64, BLOCK)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        x = _load_parts(parts_ptr + b * N_POLICY_PARTS, b < B, N_POLICY_PARTS)
        x = x + (tl.where(x[PP_COUNT] > 0, 1.0, 0.0), tl.where(x[PP_LOW] + x[PP_HIGH] > 0, 1.0, 0.0))
        acc = _parts_fold(acc, x, b < B, PP_MIN, PP_MAX)
    t = _parts_total(acc, PP_MIN, PP_MAX)
    total, rows_with, rows_clipped = t[PP_COUNT], t[N_POLICY_PARTS], t[N_POLICY_PARTS + 1]
    _weigh_rows(parts_ptr, N_POLICY_PARTS, PP_ROW_GRAD, num_tokens_ptr, loss_ptr, scale_ptr, B, numel, total,
                rows_with, AGG, HAS_NT, BLOCK)
    n = tl.maximum(total, 1.0)
    stats = ((t[PP_LOW] + t[PP_HIGH]) / n, t[PP_LOW] / n, t[PP_HIGH] / n, t[PP_DUAL] / n, t[PP_KL] / n,
             t[PP_RATIO] / n, tl.where(total > 0, t[PP_MIN], 0.0), tl.where(total > 0, t[PP_MAX], 0.0),
             rows_clipped / tl.maximum(rows_with, 1.0), t[PP_IS_WEIGHT] / n, t[PP_IS_CAPPED] / n)
    for k in tl.static_range(len(stats)):
        tl.store(stats_ptr + k, stats[k].to(tl.float32))


@triton.jit
def _policy_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr,  # [B, T] float32
    roll_ptr,        # [B, T] float32 rollout log-probabilities (logprobs without them)
    mask_ptr,        # [B, T] int8 (0/1)
    parts_ptr,       # [max(B, 1) * N_POLICY_PARTS + 1] float64 scratch, zero at launch (_scratch)
    num_tokens_ptr,  # [] float64, read only when HAS_NT
    loss_ptr,        # [] float32 out
    stats_ptr,       # [len(POLICY_STATS)] float32 out
    scale_ptr,       # [B] float32 out: row weights times the rows' factors in the gradient
    B, T, numel, clip_low, clip_high, dual_clip, is_cap,
    HAS_DUAL: tl.constexpr, AGG: tl.constexpr, HAS_NT: tl.constexpr,
    SEQ_RATIO: tl.constexpr, SEQ_GRAD: tl.constexpr, CISPO: tl.constexpr, IS_MODE: tl.constexpr,  # _policy_flags
    TOKEN_IS: tl.constexpr, ROW_IS: tl.constexpr, IS_GEOMETRIC: tl.constexpr, ROW_SUMS: tl.constexpr,
    PLAIN: tl.constexpr,
    BLOCK: tl.constexpr,          # tile over T in the row pass
    COMBINE_BLOCK: tl.constexpr,  # tile over B in the combine
):
    # grid (max(B, 1),): with B == 0 the one program only combines (loss 0, stats 0)
    row = tl.program_id(0).to(tl.int64)
    if row < B:
        _policy_row(logp_ptr, old_ptr, adv_ptr, roll_ptr, mask_ptr, parts_ptr, row, T, clip_low, clip_high,
                    dual_clip, is_cap, HAS_DUAL, SEQ_RATIO, SEQ_GRAD, CISPO, IS_MODE, TOKEN_IS, ROW_IS,
                    IS_GEOMETRIC, ROW_SUMS, PLAIN, BLOCK)
    if _last_to_arrive(parts_ptr, N_POLICY_PARTS):
        _policy_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel, AGG, HAS_NT,
                        COMBINE_BLOCK)


@triton.jit
def _policy_grad_token(logp, old, adv, rollout, clip_low, clip_high, dual_clip, is_cap, HAS_DUAL: tl.constexpr,
                       SEQ_RATIO: tl.constexpr, SEQ_GRAD: tl.constexpr, CISPO: tl.constexpr, IS_MODE: tl.constexpr,
                       TOKEN_IS: tl.constexpr):
    # what of d(c*l)/dlogp varies per token, beside the row's factor in row_scale (policy_grad_token
    # in rlhf/ppo.h): _policy_token's at a row ratio and row weight of 1; rollout is read only with TOKEN_IS
    dlogp = tl.full(logp.shape, 1.0, tl.float32)
    if not SEQ_GRAD:
        dlogp = _policy_token(logp, old, adv, rollout, 1.0, 0.0, clip_low, clip_high, dual_clip, is_cap, HAS_DUAL,
                              SEQ_RATIO, CISPO, IS_MODE, TOKEN_IS)[PP_ROW_GRAD]
    return dlogp


@triton.jit
def _value_token(v, old_v, ret, clip, HAS_CLIP: tl.constexpr):
    # (0.5 * the larger square, dl/dv, whether the clipped one is larger)
    err = v - ret
    sq = err * err
    is_clipped = v != v  # false (inputs are finite where valid)
    if HAS_CLIP:
        err_c = tl.minimum(tl.maximum(v, old_v - clip), old_v + clip) - ret
        is_clipped = err_c * err_c > sq
        sq = tl.where(is_clipped, err_c * err_c, sq)
    return 0.5 * sq, tl.where(is_clipped, 0.0, err), is_clipped


@triton.jit
def _value_row(v_ptr, old_ptr, ret_ptr, mask_ptr, parts_ptr, row, T, clip,
               HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    # stores row `row`'s partials in parts_ptr[row, :] (arguments as _value_fwd_kernel)
    # sums of the loss, the count, the clipped tokens, R and R - V (float64 differences)
    acc = _parts_init(5, -1, -1, tl.float64, BLOCK)
    for start in range(0, T, BLOCK):
        idx, _, valid = _tile(mask_ptr, row, T, start + tl.arange(0, BLOCK))
        v, o, r = _loads((v_ptr, old_ptr, ret_ptr), idx, valid)
        l, _, is_clipped = _value_token(v, o, r, clip, HAS_CLIP)
        acc = _parts_fold(acc, (l, tl.full(l.shape, 1.0, tl.float32), tl.where(is_clipped, 1.0, 0.0), r,
                                r.to(tl.float64) - v.to(tl.float64)), valid, -1, -1)
    s_loss, n, s_clip, s_r, s_e = _parts_total(acc, -1, -1)
    mean_r = s_r / tl.maximum(n, 1.0)
    mean_e = s_e / tl.maximum(n, 1.0)
    acc = _parts_init(2, -1, -1, tl.float64, BLOCK)
    for start in range(0, T, BLOCK):
        idx, _, valid = _tile(mask_ptr, row, T, start + tl.arange(0, BLOCK))
        v, r = _loads((v_ptr, ret_ptr), idx, valid)
        dr = r.to(tl.float64) - mean_r
        de = (r.to(tl.float64) - v.to(tl.float64)) - mean_e
        acc = _parts_fold(acc, (dr * dr, de * de), valid, -1, -1)
    m2_r, m2_e = _parts_total(acc, -1, -1)
    x = (s_loss, n, s_clip, mean_r, m2_r, mean_e, m2_e)  # in VALUE_PARTS' order
    for k in tl.static_range(N_VALUE_PARTS):
        tl.store(parts_ptr + row * N_VALUE_PARTS + k, x[k])


@triton.jit
def _value_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel,
                   AGG: tl.constexpr, HAS_NT: tl.constexpr, BLOCK: tl.constexpr):
    # run by the last program only
    # over rows: valid tokens, rows with any, clipped tokens, and the counts times the means of R and R - V
    acc = _parts_init(5, -1, -1, tl.float64, BLOCK)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        x = _load_parts(parts_ptr + b * N_VALUE_PARTS, b < B, N_VALUE_PARTS)
        cnt = x[VP_COUNT]
        acc = _parts_fold(acc, (cnt, tl.where(cnt > 0, 1.0, 0.0), x[VP_CLIPPED], cnt * x[VP_MEAN_R],
                                cnt * x[VP_MEAN_E]), b < B, -1, -1)
    total, rows_with, clipped, sum_r, sum_e = _parts_total(acc, -1, -1)
    n = tl.maximum(total, 1.0)
    mean_r = sum_r / n
    mean_e = sum_e / n
    _weigh_rows(parts_ptr, N_VALUE_PARTS, -1, num_tokens_ptr, loss_ptr, scale_ptr, B, numel, total, rows_with, AGG,
                HAS_NT, BLOCK)
    acc = _parts_init(2, -1, -1, tl.float64, BLOCK)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        x = _load_parts(parts_ptr + b * N_VALUE_PARTS, b < B, N_VALUE_PARTS)
        # total sum of squares = within rows + between rows (exact split)
        dr = x[VP_MEAN_R] - mean_r
        de = x[VP_MEAN_E] - mean_e
        acc = _parts_fold(acc, (x[VP_M2_R] + x[VP_COUNT] * dr * dr, x[VP_M2_E] + x[VP_COUNT] * de * de), b < B, -1, -1)
    var_r, m2_e = _parts_total(acc, -1, -1)
    tl.store(stats_ptr + S_VF_CLIPFRAC, (clipped / n).to(tl.float32))
    ev = tl.where(var_r > 0, 1.0 - m2_e / tl.where(var_r > 0, var_r, 1.0), 0.0)
    tl.store(stats_ptr + S_EXPLAINED_VAR, ev.to(tl.float32))


@triton.jit
def _value_fwd_kernel(
    v_ptr, old_ptr, ret_ptr,   # [B, T] float32
    mask_ptr,                  # [B, T] int8
    parts_ptr,                 # [max(B, 1) * N_VALUE_PARTS + 1] float64 scratch, zero at launch (_scratch)
    num_tokens_ptr,            # [] float64, read only when HAS_NT
    loss_ptr,                  # [] float32 out
    stats_ptr,                 # [len(VALUE_STATS)] float32 out
    scale_ptr,                 # [B] float32 out: row weights
    B, T, numel, clip,
    HAS_CLIP: tl.constexpr, AGG: tl.constexpr, HAS_NT: tl.constexpr,
    BLOCK: tl.constexpr, COMBINE_BLOCK: tl.constexpr,  # as _policy_fwd_kernel
):
    row = tl.program_id(0).to(tl.int64)
    if row < B:
        _value_row(v_ptr, old_ptr, ret_ptr, mask_ptr, parts_ptr, row, T, clip, HAS_CLIP, BLOCK)
    if _last_to_arrive(parts_ptr, N_VALUE_PARTS):
        _value_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel, AGG, HAS_NT,
                       COMBINE_BLOCK)


@triton.jit
def _value_grad_token(v, old_v, ret, _, clip, _1, _2, _3, HAS_CLIP: tl.constexpr):
    # dl/dv, as _bwd_kernel calls it (input 3 and scalars 1-3 unused)
    return _value_token(v, old_v, ret, clip, HAS_CLIP)[1]


@triton.jit
def _bwd_kernel(
    grad_ptr,                    # [] float32: d loss
    x_ptr, a_ptr, b_ptr, c_ptr,  # [B, T] float32: x (logprobs or values) and the other inputs of GRAD
    mask_ptr,                    # [B, T] int8
    scale_ptr,                   # [B] float32 row_scale (the forward's)
    out_ptr,                     # [B, T] float32 out: d x
    T, p0, p1, p2, p3,           # GRAD's scalars
    GRAD: tl.constexpr,          # the per-token factor: _policy_grad_token or _value_grad_token
    FLAGS: tl.constexpr,         # GRAD's constexpr arguments, a tuple
    BLOCK: tl.constexpr,
):
    # d x = grad * row_scale * GRAD(...); a load whose value GRAD does not use is removed by the compiler
    row = tl.program_id(0).to(tl.int64)
    idx, inb, valid = _tile(mask_ptr, row, T, tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))
    x, a, b, c = _loads((x_ptr, a_ptr, b_ptr, c_ptr), idx, valid)
    d = GRAD(x, a, b, c, p0, p1, p2, p3, *FLAGS)
    s = tl.load(grad_ptr) * tl.load(scale_ptr + row)
    tl.store(out_ptr + idx, tl.where(valid, s * d, 0.0), mask=inb)


def _scratch(rows, n_parts, device):
    """A forward's scratch, [rows * n_parts + 1] float64, zero: the rows' partials, then the
    int32 ticket counter in the last slot. One allocation and one fill per call, as the CUDA
    path's cudaMemsetAsync, so no two launches ever share a counter. A counter cached per
    (device, stream) and reset by the last program is not safe: a CUDA graph captured on a
    stream that already ran eager calls bakes the cached counter in (so do two graphs
    captured on one stream); replayed on other streams while eager calls run, two launches
    then draw tickets from one counter and one's reset wipes the other's (a wrong loss,
    uninitialized stats, and every later call on that stream wrong); and
    torch.compile(mode="reduce-overhead") may rewind the private pool a counter was made in."""
    return torch.zeros(rows * n_parts + 1, dtype=torch.float64, device=device)


def _forward(kernel, n_parts, n_stats, x, inputs, num_tokens, args, **constexprs):
    """One forward launch over the [B, T] inputs (x the first): returns (loss [], stats [n_stats],
    row_scale [B]); num_tokens a 0-d float64 tensor or None."""
    B, T = x.shape
    loss, stats, scale = x.new_empty(()), x.new_empty((n_stats,)), x.new_empty((B,))
    parts = _scratch(max(B, 1), n_parts, x.device)
    block = _common.block(T, 1024, 64, floor=16)
    kernel[(max(B, 1),)](*inputs, parts, num_tokens if num_tokens is not None else parts, loss, stats, scale, B, T,
                         float(B * T), *args, HAS_NT=num_tokens is not None, **constexprs, BLOCK=block,
                         COMBINE_BLOCK=COMBINE_BLOCK, num_warps=_fwd_warps(block))
    return loss, stats, scale


def _backward(token_grad, flags, grad, inputs, mask, scale, args):
    """One _bwd_kernel launch: d inputs[0] [B, T]."""
    B, T = mask.shape
    out = torch.empty_like(inputs[0])
    if out.numel():
        block = _common.block(T, 1024, 64, floor=16)
        _bwd_kernel[(B, triton.cdiv(T, block))](grad, *inputs, mask.view(torch.int8), scale, out, T, *args,
                                                GRAD=token_grad, FLAGS=flags, BLOCK=block)
    return out


def _policy_forward(logp, old, adv, mask, num_tokens, clip_low, clip_high, dual_clip, agg, rollout, options, is_cap):
    """[B, T] float32 contiguous inputs, bool mask; num_tokens a 0-d float64 tensor or None;
    rollout [B, T] float32 or None; options the packed options (rlhf_kernels/_layout.py)."""
    return _forward(_policy_fwd_kernel, len(POLICY_PARTS), len(POLICY_STATS), logp,
                    (logp, old, adv, rollout if rollout is not None else logp, mask.view(torch.int8)), num_tokens,
                    (clip_low, clip_high, dual_clip or 0.0, is_cap), HAS_DUAL=dual_clip is not None, AGG=agg,
                    **_policy_flags(options))


def _policy_backward(grad, logp, old, adv, mask, scale, clip_low, clip_high, dual_clip, rollout, options, is_cap):
    f = _policy_flags(options)
    flags = (dual_clip is not None,) + tuple(f[k] for k in ("SEQ_RATIO", "SEQ_GRAD", "CISPO", "IS_MODE", "TOKEN_IS"))
    return _backward(_policy_grad_token, flags, grad, (logp, old, adv, rollout if rollout is not None else logp), mask,
                     scale, (clip_low, clip_high, dual_clip or 0.0, is_cap))


def _value_forward(values, old, returns, mask, num_tokens, clip, agg):
    return _forward(_value_fwd_kernel, len(VALUE_PARTS), len(VALUE_STATS), values,
                    (values, old, returns, mask.view(torch.int8)), num_tokens, (clip or 0.0,),
                    HAS_CLIP=clip is not None, AGG=agg)


def _value_backward(grad, values, old, returns, mask, scale, clip):
    return _backward(_value_grad_token, (clip is not None,), grad, (values, old, returns, returns), mask, scale,
                     (clip or 0.0, 0.0, 0.0, 0.0))


def _autograd(backward, n_inputs, args, tensors=()):
    """(setup_context, backward) of a forward whose [B, T] inputs 0-3 come first, whose outputs
    are (loss, stats, row_scale) and whose gradient goes to input 0: backward(grad, inputs 0-3,
    row_scale, *inputs[args]); the inputs in `tensors` (tensors or None) are saved as tensors."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4], output[2], *(inputs[i] for i in tensors))
        ctx.args = [None if i in tensors else inputs[i] for i in args]
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)

    def grad(ctx, grad_loss, grad_stats, grad_scale):
        if grad_loss is None:
            return (None,) * n_inputs
        saved = ctx.saved_tensors
        kept = dict(zip(tensors, saved[5:]))
        a = [kept.get(i, v) for i, v in zip(args, ctx.args)]
        return (backward(grad_loss.float().contiguous(), *saved[:5], *a),) + (None,) * (n_inputs - 1)
    return setup, grad


# ---- the ops (rlhf_kernels/triton/_op.py): float32 contiguous [B, T] inputs and a bool mask,
# checked and converted by rlhf_kernels/ops/ppo.py; the gradient flows to logprobs / values only.

policy_backward = Op("ppo_policy_bwd", _policy_backward, required=("clip_high", "is_cap"))
# the plain loss and the options alike (options 0: the plain loss); inputs: logp, old, adv, mask,
# num_tokens, clip_low, clip_high, dual_clip, agg, rollout, options, is_cap
policy_forward = DifferentiableOp("ppo_policy_options_fwd", _policy_forward,
                                  *_autograd(policy_backward, 12, (5, 6, 7, 9, 10, 11), tensors=(9,)),
                                  drop=("num_tokens_value",), required=("clip_high", "is_cap"))
value_backward = Op("ppo_value_bwd", _value_backward)
# inputs: values, old, returns, mask, num_tokens, clip, agg
value_forward = DifferentiableOp("ppo_value_fwd", _value_forward, *_autograd(value_backward, 7, (5,)),
                                 drop=("num_tokens_value",))
