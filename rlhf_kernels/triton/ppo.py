"""PPO policy and value losses in Triton.

Forward, one launch per loss (_policy_fwd_kernel / _value_fwd_kernel), max(B, 1)
programs: program b walks row b in tiles and stores float64 partial sums in `parts`,
then draws a ticket from an int32 counter (_last_to_arrive); the program that draws the
last ticket combines all rows in a fixed order and writes the loss, the statistics and
each row's weight w_b in the aggregated loss (loss = sum_b w_b * sum_t l_bt). Which
program comes last varies between runs but the combine order does not, so the results
are bitwise the same on every run (the only atomic is the integer ticket). The counter
is made and zeroed per call, in the same allocation as the partials (``_scratch``), as the
CUDA path does: no two launches can share one (see ``_scratch`` for why a cached counter
is unsafe).
Memory ordering (the "last block" pattern): each program's stores of its partials are
ordered before its ticket by a CTA barrier and the release half of the acq_rel atomic;
the last program's acquire half orders its loads after every other program's ticket, and
it loads the partials with the .cg modifier (from L2, not the incoherent L1). The
interpreter (TRITON_INTERPRET=1, used by the tests) runs programs one after another, so
it checks the logic, not the ordering; the ordering is checked on a GPU.
Backward is elementwise: d_x[b, t] = grad * w_b * dl/dx[b, t]. The per-token math mirrors
csrc/include/rlhf/ppo.h, the policy loss's options too: they are constexpr flags (_policy_flags),
so the plain loss (options = 0) compiles to the code it had before them; options that need a
row's sums (the sequence ratio, a sequence-level IS weight) take a float64 pass over the row
first, and the row's factor in the gradient g_b (row_grad) makes row_scale = w_b * g_b.
"""

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
S_CLIPFRAC, S_LOW, S_HIGH, S_DUAL, S_KL, S_RATIO, S_MIN, S_MAX = (
    _index(POLICY_STATS, n) for n in ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                                      "ratio_mean", "ratio_min", "ratio_max"))
S_SEQ_CLIPFRAC, S_IS_WEIGHT_MEAN, S_IS_CAPPED_FRAC = (
    _index(POLICY_STATS, n) for n in ("seq_clipfrac", "is_weight_mean", "is_capped_frac"))
S_VF_CLIPFRAC, S_EXPLAINED_VAR = (_index(VALUE_STATS, n) for n in ("vf_clipfrac", "explained_var"))
AGG_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_SEQ_MEAN_TOKEN_SUM_NORM, AGG_TOKEN_SUM = (
    _index(LOSS_AGGS, n) for n in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                   "seq-mean-token-sum-norm", "token-sum"))
# _policy_token returns a token's values in the columns' order
assert [k.value for k in (PP_LOSS, PP_COUNT, PP_LOW, PP_HIGH, PP_DUAL, PP_KL, PP_RATIO, PP_MIN, PP_MAX, PP_ROW_GRAD,
                          PP_IS_WEIGHT, PP_IS_CAPPED)] == list(range(len(POLICY_PARTS)))
# the fields of `options` and their codes, by name
_OPT_FIELDS = {field: (i, names) for i, (field, names) in enumerate(POLICY_OPTIONS)}
IS_NONE, IS_MASK = (_index(_OPT_FIELDS["is_correction"][1], n) for n in ("none", "mis"))


def _block(n):
    return _common.block(n, 1024, 64, floor=16)


# Launch settings of the forwards. The row pass keeps 10-12 float64 accumulators per
# element of its block and the combine 13, so the register count follows elements per thread:
# compiled for sm_90, _policy_fwd_kernel at BLOCK = COMBINE_BLOCK = 1024 with 4 warps took 255
# registers and an 8-byte stack (spilled). The combine tiles B in a fixed block (masked: it runs
# once, in one program) instead of one growing with B, and BLOCK = 1024 takes 8 warps: no
# forward spills at any block it is launched with (benchmarks/static_sm90.py checks every one).
COMBINE_BLOCK = 64 if _common.INTERPRET else 256


def _fwd_warps(block):
    return 8 if block >= 1024 else 4


def _option(options, field):
    """The name of field `field`'s code in `options`."""
    i, names = _OPT_FIELDS[field]
    return names[(options >> (OPTION_BITS * i)) & ((1 << OPTION_BITS) - 1)]


_flags_cache = {}


def _policy_flags(options):
    """The kernels' constexpr flags for `options` (checked by rlhf_kernels/ops/ppo.py)."""
    flags = _flags_cache.get(options)
    if flags is None:
        is_mode = _OPT_FIELDS["is_correction"][1].index(_option(options, "is_correction"))
        is_token = _option(options, "is_level") in ("none", "token")
        seq_ratio = _option(options, "ratio_level") == "sequence"
        cispo = _option(options, "objective") == "cispo"
        flags = dict(SEQ_RATIO=seq_ratio,                # every token uses its row's ratio s
                     SEQ_GRAD=seq_ratio and not cispo,   # the gradient is the row's (row_grad)
                     CISPO=cispo,
                     IS_MODE=is_mode,                    # the is_correction code: IS_NONE, tis or IS_MASK
                     TOKEN_IS=is_mode != IS_NONE and is_token,      # a weight per token
                     ROW_IS=is_mode != IS_NONE and not is_token,    # one weight per row
                     IS_GEOMETRIC=_option(options, "is_level") == "geometric",
                     ROW_SUMS=seq_ratio or (is_mode != IS_NONE and not is_token),
                     PLAIN=options == 0)
        _flags_cache[options] = flags
    return flags


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
    if HAS_DUAL:
        cap = -adv * dual_clip
        is_dual = (adv < 0.0) & (cap < l)
        l = tl.where(is_dual, cap, l)
        dx = tl.where(is_dual, 0.0, dx)
    else:
        is_dual = adv != adv  # all false
    return l, dx, is_low, is_high, is_dual


@triton.jit
def _cispo_clip(logp, ratio, adv, clip_low, clip_high):
    # l = -sg(clip(ratio)) * A * logp, dl/dlogp = -clip(ratio) * A (cispo_clip in rlhf/ppo.h)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    dlogp = -tl.minimum(tl.maximum(ratio, lo), hi) * adv
    return dlogp * logp, dlogp, ratio < lo, ratio > hi


@triton.jit
def _is_weight(log_w, is_cap, IS_MODE: tl.constexpr):
    # (applied weight, w > cap) of w = exp(log_w): min(w, cap) (tis), w or 0 above cap (IS_MASK)
    w = tl.exp(log_w)
    over = w > is_cap
    if IS_MODE == IS_MASK:
        c = tl.where(over, 0.0, w)
    else:
        c = tl.where(over, is_cap, w)
    return c, over


@triton.jit
def _policy_token(logp, old_logp, adv, rollout, row_ratio, row_log_w, clip_low, clip_high, dual_clip, is_cap,
                  HAS_DUAL: tl.constexpr, SEQ_RATIO: tl.constexpr, CISPO: tl.constexpr, IS_MODE: tl.constexpr,
                  TOKEN_IS: tl.constexpr):
    # policy_token in rlhf/ppo.h: the token's values of the partials, in POLICY_PARTS' order: c*l, 1, is_low,
    # is_high, is_dual, k3 of the token's own ratio, the ratio used (three times: sum, min, max), d(c*l)/dlogp
    # (d/ds for the PPO loss with SEQ_RATIO), the applied weight c and whether w was capped
    log_ratio = logp - old_logp
    own = tl.exp(log_ratio)
    if SEQ_RATIO:
        ratio = row_ratio + tl.zeros_like(own)
        dratio = 1.0
    else:
        ratio = own
        dratio = own
    if CISPO:
        l, dlogp, is_low, is_high = _cispo_clip(logp, ratio, adv, clip_low, clip_high)
        is_dual = adv != adv  # all false
    else:
        l, dlogp, is_low, is_high, is_dual = _ppo_clip(ratio, dratio, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
    kl = (own - 1.0) - log_ratio
    one = tl.full(own.shape, 1.0, tl.float32)
    if IS_MODE != IS_NONE:
        if TOKEN_IS:
            c, capped = _is_weight(old_logp - rollout, is_cap, IS_MODE)
        else:
            c, capped = _is_weight(row_log_w + tl.zeros_like(own), is_cap, IS_MODE)
        l = c * l
        dlogp = c * dlogp
    else:
        c = one
        capped = adv != adv
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
    # columns 0..N-1 of the rows' partials at p (0 outside inb), written by other programs: loaded with .cg
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
def _row_sums(logp_ptr, old_ptr, roll_ptr, mask_ptr, row, T, ROW_IS: tl.constexpr, BLOCK: tl.constexpr):
    # float64 sums over row `row`'s valid tokens of logp - old_logp and of old_logp - rollout, and their count
    a_lr = tl.zeros((BLOCK,), tl.float64)
    a_lw = tl.zeros((BLOCK,), tl.float64)
    a_n = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, T, BLOCK):
        idx, _, valid = _tile(mask_ptr, row, T, start + tl.arange(0, BLOCK))
        old = tl.load(old_ptr + idx, mask=valid, other=0.0).to(tl.float64)
        a_lr += tl.where(valid, tl.load(logp_ptr + idx, mask=valid, other=0.0).to(tl.float64) - old, 0.0)
        if ROW_IS:
            a_lw += tl.where(valid, old - tl.load(roll_ptr + idx, mask=valid, other=0.0).to(tl.float64), 0.0)
        a_n += tl.where(valid, 1.0, 0.0).to(tl.float64)
    return tl.sum(a_lr, 0), tl.sum(a_lw, 0), tl.sum(a_n, 0)


@triton.jit
def _policy_row(logp_ptr, old_ptr, adv_ptr, roll_ptr, mask_ptr, parts_ptr, row, T, clip_low, clip_high, dual_clip,
                is_cap, HAS_DUAL: tl.constexpr, SEQ_RATIO: tl.constexpr, SEQ_GRAD: tl.constexpr, CISPO: tl.constexpr,
                IS_MODE: tl.constexpr, TOKEN_IS: tl.constexpr, ROW_IS: tl.constexpr, IS_GEOMETRIC: tl.constexpr,
                ROW_SUMS: tl.constexpr, PLAIN: tl.constexpr, BLOCK: tl.constexpr):
    # stores row `row`'s partials in parts_ptr[row, :] (arguments as _policy_fwd_kernel)
    row_ratio = 1.0
    row_log_w = 0.0
    if ROW_SUMS:
        sum_lr, sum_lw, n = _row_sums(logp_ptr, old_ptr, roll_ptr, mask_ptr, row, T, ROW_IS, BLOCK)
        row_ratio = tl.exp((sum_lr / tl.maximum(n, 1.0)).to(tl.float32))
        if IS_GEOMETRIC:
            row_log_w = (sum_lw / tl.maximum(n, 1.0)).to(tl.float32)
        else:
            row_log_w = sum_lw.to(tl.float32)
    # the plain loss sums the columns up to ratio_max only; else the row_grad column sums d(c*l)/ds
    acc = _parts_init(PP_ROW_GRAD if PLAIN else N_POLICY_PARTS, PP_MIN, PP_MAX, tl.float32, BLOCK)
    for start in range(0, T, BLOCK):
        idx, _, valid = _tile(mask_ptr, row, T, start + tl.arange(0, BLOCK))
        logp = tl.load(logp_ptr + idx, mask=valid, other=0.0)
        old = tl.load(old_ptr + idx, mask=valid, other=0.0)
        adv = tl.load(adv_ptr + idx, mask=valid, other=0.0)
        if TOKEN_IS:
            roll = tl.load(roll_ptr + idx, mask=valid, other=0.0)
        else:
            roll = old
        x = _policy_token(logp, old, adv, roll, row_ratio, row_log_w, clip_low, clip_high, dual_clip, is_cap, HAS_DUAL,
                          SEQ_RATIO, CISPO, IS_MODE, TOKEN_IS)
        acc = _parts_fold(acc, x, valid, PP_MIN, PP_MAX)
    t = _parts_total(acc, PP_MIN, PP_MAX)
    out = parts_ptr + row * N_POLICY_PARTS
    for k in tl.static_range(PP_ROW_GRAD):
        tl.store(out + k, t[k])
    count = t[PP_COUNT]
    if PLAIN:
        tl.store(out + PP_ROW_GRAD, count * 0.0 + 1.0)
        tl.store(out + PP_IS_WEIGHT, count)
        tl.store(out + PP_IS_CAPPED, count * 0.0)
    else:
        # row_grad_factor in rlhf/ppo.h
        if SEQ_GRAD:
            g = row_ratio.to(tl.float64) / tl.maximum(count, 1.0) * t[PP_ROW_GRAD]
        else:
            g = count * 0.0 + 1.0
            if ROW_IS:
                c_row, _ = _is_weight(row_log_w, is_cap, IS_MODE)
                g = c_row.to(tl.float64) + count * 0.0
            if SEQ_RATIO:
                g *= tl.minimum(tl.maximum(row_ratio, 1.0 - clip_low), 1.0 + clip_high).to(tl.float64)
        tl.store(out + PP_ROW_GRAD, g)
        tl.store(out + PP_IS_WEIGHT, t[PP_IS_WEIGHT])
        tl.store(out + PP_IS_CAPPED, t[PP_IS_CAPPED])


@triton.jit
def _row_weight(count, total, rows_with, numel, num_tokens, AGG: tl.constexpr, HAS_NT: tl.constexpr):
    # weight of each token of a row in the aggregated loss; mirrors ppo_row_weight in rlhf/ppo.h
    if AGG == AGG_TOKEN_MEAN:
        if HAS_NT:
            denom = num_tokens + count * 0.0
        else:
            denom = total + count * 0.0
    elif AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
        denom = count * rows_with
    elif AGG == AGG_SEQ_MEAN_TOKEN_SUM:
        denom = rows_with + count * 0.0
    elif AGG == AGG_SEQ_MEAN_TOKEN_SUM_NORM:
        denom = numel + count * 0.0
    else:  # AGG_TOKEN_SUM
        denom = count * 0.0 + 1.0
    return tl.where(count > 0, 1.0 / tl.where(count > 0, denom, 1.0), 0.0)


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
    # the gradient; -1: none); loss and count are the same columns in both losses' partials
    if HAS_NT:
        nt = tl.load(num_tokens_ptr)
    else:
        nt = total
    a_loss = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        x = _load_parts(parts_ptr + b * N_PARTS, b < B, N_PARTS)
        w = _row_weight(x[PP_COUNT], total, rows_with, numel, nt, AGG, HAS_NT)
        a_loss += w * x[PP_LOSS]
        if GRAD_K >= 0:
            w = w * x[GRAD_K]
        tl.store(scale_ptr + b, w.to(tl.float32), mask=b < B)
    tl.store(loss_ptr, tl.sum(a_loss, 0).to(tl.float32))


@triton.jit
def _policy_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel,
                    AGG: tl.constexpr, HAS_NT: tl.constexpr, BLOCK: tl.constexpr):
    # run by the last program only: every column over rows, then the rows with a valid token and
    # the rows with a clipped one
    acc = _parts_init(N_POLICY_PARTS, PP_MIN, PP_MAX, tl.float64, BLOCK)
    a_rows = tl.zeros((BLOCK,), tl.float64)
    a_seq_clip = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        x = _load_parts(parts_ptr + b * N_POLICY_PARTS, b < B, N_POLICY_PARTS)
        acc = _parts_fold(acc, x, b < B, PP_MIN, PP_MAX)
        a_rows += tl.where(x[PP_COUNT] > 0, 1.0, 0.0)
        a_seq_clip += tl.where(x[PP_LOW] + x[PP_HIGH] > 0, 1.0, 0.0)
    t = _parts_total(acc, PP_MIN, PP_MAX)
    rows_with = tl.sum(a_rows, 0)
    _weigh_rows(parts_ptr, N_POLICY_PARTS, PP_ROW_GRAD, num_tokens_ptr, loss_ptr, scale_ptr, B, numel, t[PP_COUNT],
                rows_with, AGG, HAS_NT, BLOCK)
    _policy_stats(stats_ptr, t, rows_with, tl.sum(a_seq_clip, 0))


@triton.jit
def _policy_stats(stats_ptr, t, rows_with, rows_clipped):
    # the statistics from the totals t over rows of the partials (policy_stats in rlhf/ppo.h): means
    # over valid tokens (0 without any), and the fraction of rows with a valid token that clip one
    total = t[PP_COUNT]
    n = tl.maximum(total, 1.0)
    tl.store(stats_ptr + S_CLIPFRAC, ((t[PP_LOW] + t[PP_HIGH]) / n).to(tl.float32))
    tl.store(stats_ptr + S_LOW, (t[PP_LOW] / n).to(tl.float32))
    tl.store(stats_ptr + S_HIGH, (t[PP_HIGH] / n).to(tl.float32))
    tl.store(stats_ptr + S_DUAL, (t[PP_DUAL] / n).to(tl.float32))
    tl.store(stats_ptr + S_KL, (t[PP_KL] / n).to(tl.float32))
    tl.store(stats_ptr + S_RATIO, (t[PP_RATIO] / n).to(tl.float32))
    tl.store(stats_ptr + S_MIN, tl.where(total > 0, t[PP_MIN], 0.0).to(tl.float32))
    tl.store(stats_ptr + S_MAX, tl.where(total > 0, t[PP_MAX], 0.0).to(tl.float32))
    tl.store(stats_ptr + S_SEQ_CLIPFRAC, (rows_clipped / tl.maximum(rows_with, 1.0)).to(tl.float32))
    tl.store(stats_ptr + S_IS_WEIGHT_MEAN, (t[PP_IS_WEIGHT] / n).to(tl.float32))
    tl.store(stats_ptr + S_IS_CAPPED_FRAC, (t[PP_IS_CAPPED] / n).to(tl.float32))


@triton.jit
def _policy_fwd_kernel(
    logp_ptr,        # [B, T] float32
    old_ptr,         # [B, T] float32
    adv_ptr,         # [B, T] float32
    roll_ptr,        # [B, T] float32 rollout log-probabilities, read only with a correction
    mask_ptr,        # [B, T] int8 (0/1)
    parts_ptr,       # [max(B, 1) * N_POLICY_PARTS + 1] float64 scratch, zero at launch: row
                     # partials, then the int32 ticket counter (_scratch)
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
    # in rlhf/ppo.h); rollout is read only with TOKEN_IS
    if SEQ_GRAD:
        dlogp = tl.full(logp.shape, 1.0, tl.float32)
    else:
        if CISPO:
            if SEQ_RATIO:
                dlogp = -adv
            else:
                _, dlogp, _, _ = _cispo_clip(logp, tl.exp(logp - old), adv, clip_low, clip_high)
        else:
            dlogp = _policy_token(logp, old, adv, old, 1.0, 0.0, clip_low, clip_high, dual_clip, is_cap, HAS_DUAL,
                                  False, False, IS_NONE, False)[PP_ROW_GRAD]
        if TOKEN_IS:
            c, _ = _is_weight(old - rollout, is_cap, IS_MODE)
            dlogp = c * dlogp
    return dlogp


@triton.jit
def _policy_bwd_kernel(
    grad_ptr,      # [] float32: d loss
    logp_ptr, old_ptr, adv_ptr,  # [B, T] float32
    roll_ptr,      # [B, T] float32, read only with a token-level correction
    mask_ptr,      # [B, T] int8
    scale_ptr,     # [B] float32 row weights times the rows' factors in the gradient
    out_ptr,       # [B, T] float32 out: d logprobs
    T, clip_low, clip_high, dual_clip, is_cap,
    HAS_DUAL: tl.constexpr, SEQ_RATIO: tl.constexpr, SEQ_GRAD: tl.constexpr, CISPO: tl.constexpr,
    IS_MODE: tl.constexpr, TOKEN_IS: tl.constexpr, BLOCK: tl.constexpr,
):
    # d logp = grad * row_scale * the per-token factor (policy_grad_token in rlhf/ppo.h)
    row = tl.program_id(0).to(tl.int64)
    idx, inb, valid = _tile(mask_ptr, row, T, tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))
    if SEQ_GRAD:
        dlogp = tl.full((BLOCK,), 1.0, tl.float32)
    else:
        logp = tl.load(logp_ptr + idx, mask=valid, other=0.0)
        old = tl.load(old_ptr + idx, mask=valid, other=0.0)
        adv = tl.load(adv_ptr + idx, mask=valid, other=0.0)
        rollout = old
        if TOKEN_IS:
            rollout = tl.load(roll_ptr + idx, mask=valid, other=0.0)
        dlogp = _policy_grad_token(logp, old, adv, rollout, clip_low, clip_high, dual_clip, is_cap, HAS_DUAL,
                                   SEQ_RATIO, SEQ_GRAD, CISPO, IS_MODE, TOKEN_IS)
    s = tl.load(grad_ptr) * tl.load(scale_ptr + row)
    tl.store(out_ptr + idx, tl.where(valid, s * dlogp, 0.0), mask=inb)


@triton.jit
def _value_token(v, old_v, ret, clip, HAS_CLIP: tl.constexpr):
    err = v - ret
    unclipped = err * err
    if HAS_CLIP:
        vc = tl.minimum(tl.maximum(v, old_v - clip), old_v + clip)
        err_c = vc - ret
        clipped_term = err_c * err_c
        is_clipped = clipped_term > unclipped
        l = 0.5 * tl.where(is_clipped, clipped_term, unclipped)
        dv = tl.where(is_clipped, 0.0, err)
    else:
        is_clipped = v != v  # false (inputs are finite where valid)
        l = 0.5 * unclipped
        dv = err
    return l, dv, is_clipped


@triton.jit
def _value_row(v_ptr, old_ptr, ret_ptr, mask_ptr, parts_ptr, row, T, clip,
               HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    # stores row `row`'s partials in parts_ptr[row, :] (arguments as _value_fwd_kernel)
    # sums of the loss, the count, the clipped tokens, R and R - V (float64 differences)
    acc = _parts_init(5, -1, -1, tl.float64, BLOCK)
    for start in range(0, T, BLOCK):
        idx, _, valid = _tile(mask_ptr, row, T, start + tl.arange(0, BLOCK))
        v = tl.load(v_ptr + idx, mask=valid, other=0.0)
        o = tl.load(old_ptr + idx, mask=valid, other=0.0)
        r = tl.load(ret_ptr + idx, mask=valid, other=0.0)
        l, _, is_clipped = _value_token(v, o, r, clip, HAS_CLIP)
        acc = _parts_fold(acc, (l, tl.full(l.shape, 1.0, tl.float32), tl.where(is_clipped, 1.0, 0.0), r,
                                r.to(tl.float64) - v.to(tl.float64)), valid, -1, -1)
    s_loss, n, s_clip, s_r, s_e = _parts_total(acc, -1, -1)
    mean_r = s_r / tl.maximum(n, 1.0)
    mean_e = s_e / tl.maximum(n, 1.0)
    q_r = tl.zeros((BLOCK,), tl.float64)
    q_e = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, T, BLOCK):
        idx, _, valid = _tile(mask_ptr, row, T, start + tl.arange(0, BLOCK))
        v = tl.load(v_ptr + idx, mask=valid, other=0.0).to(tl.float64)
        r = tl.load(ret_ptr + idx, mask=valid, other=0.0).to(tl.float64)
        dr = r - mean_r
        de = (r - v) - mean_e
        q_r += tl.where(valid, dr * dr, 0.0)
        q_e += tl.where(valid, de * de, 0.0)
    out = parts_ptr + row * N_VALUE_PARTS
    tl.store(out + VP_LOSS, s_loss)
    tl.store(out + VP_COUNT, n)
    tl.store(out + VP_CLIPPED, s_clip)
    tl.store(out + VP_MEAN_R, mean_r)
    tl.store(out + VP_M2_R, tl.sum(q_r, 0))
    tl.store(out + VP_MEAN_E, mean_e)
    tl.store(out + VP_M2_E, tl.sum(q_e, 0))


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
    m2_r = tl.zeros((BLOCK,), tl.float64)
    m2_e = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + tl.arange(0, BLOCK)
        x = _load_parts(parts_ptr + b * N_VALUE_PARTS, b < B, N_VALUE_PARTS)
        # total sum of squares = within rows + between rows (exact split)
        dr = x[VP_MEAN_R] - mean_r
        de = x[VP_MEAN_E] - mean_e
        m2_r += x[VP_M2_R] + x[VP_COUNT] * dr * dr
        m2_e += x[VP_M2_E] + x[VP_COUNT] * de * de
    tl.store(stats_ptr + S_VF_CLIPFRAC, (clipped / n).to(tl.float32))
    var_r = tl.sum(m2_r, 0)
    ev = tl.where(var_r > 0, 1.0 - tl.sum(m2_e, 0) / tl.where(var_r > 0, var_r, 1.0), 0.0)
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
def _value_bwd_kernel(
    grad_ptr,                  # [] float32
    v_ptr, old_ptr, ret_ptr,   # [B, T] float32
    mask_ptr,                  # [B, T] int8
    scale_ptr,                 # [B] float32 row weights
    out_ptr,                   # [B, T] float32 out: d values
    T, clip,
    HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    idx, inb, valid = _tile(mask_ptr, row, T, tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))
    v = tl.load(v_ptr + idx, mask=valid, other=0.0)
    o = tl.load(old_ptr + idx, mask=valid, other=0.0)
    r = tl.load(ret_ptr + idx, mask=valid, other=0.0)
    _, dv, _ = _value_token(v, o, r, clip, HAS_CLIP)
    s = tl.load(grad_ptr) * tl.load(scale_ptr + row)
    tl.store(out_ptr + idx, tl.where(valid, s * dv, 0.0), mask=inb)


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
    block = _block(T)
    kernel[(max(B, 1),)](*inputs, parts, num_tokens if num_tokens is not None else parts, loss, stats, scale, B, T,
                         float(B * T), *args, HAS_NT=num_tokens is not None, **constexprs, BLOCK=block,
                         COMBINE_BLOCK=COMBINE_BLOCK, num_warps=_fwd_warps(block))
    return loss, stats, scale


def _backward(kernel, x, inputs, args, **constexprs):
    """One elementwise backward launch: d x [B, T]."""
    B, T = x.shape
    out = torch.empty_like(x)
    if x.numel():
        block = _block(T)
        kernel[(B, triton.cdiv(T, block))](*inputs, out, T, *args, **constexprs, BLOCK=block)
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
    return _backward(_policy_bwd_kernel, logp, (grad, logp, old, adv, rollout if rollout is not None else logp,
                                                mask.view(torch.int8), scale),
                     (clip_low, clip_high, dual_clip or 0.0, is_cap), HAS_DUAL=dual_clip is not None,
                     **{k: f[k] for k in ("SEQ_RATIO", "SEQ_GRAD", "CISPO", "IS_MODE", "TOKEN_IS")})


def _value_forward(values, old, returns, mask, num_tokens, clip, agg):
    return _forward(_value_fwd_kernel, len(VALUE_PARTS), len(VALUE_STATS), values,
                    (values, old, returns, mask.view(torch.int8)), num_tokens, (clip or 0.0,),
                    HAS_CLIP=clip is not None, AGG=agg)


def _value_backward(grad, values, old, returns, mask, scale, clip):
    return _backward(_value_bwd_kernel, values, (grad, values, old, returns, mask.view(torch.int8), scale),
                     (clip or 0.0,), HAS_CLIP=clip is not None)


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
