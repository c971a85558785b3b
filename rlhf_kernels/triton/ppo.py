"""PPO policy and value losses in Triton.

Forward, one launch per loss (_policy_fwd_kernel / _value_fwd_kernel), max(B, 1)
programs: program b walks row b in tiles and stores float64 partial sums in `parts`,
then draws a ticket from an int32 counter (_last_to_arrive); the program that draws the
last ticket combines all rows in a fixed order and writes the loss, the statistics and
each row's weight w_b in the aggregated loss (loss = sum_b w_b * sum_t l_bt). Which
program comes last varies between runs but the combine order does not, so the results
are bitwise the same on every run (the only atomic is the integer ticket). On CUDA the
counter is cached per (device, stream) and the last program sets it back to zero, so a
forward is one launch and no fill (``_counter``); forwards on concurrent streams never
share one.
Memory ordering (the "last block" pattern): each program's stores of its partials are
ordered before its ticket by a CTA barrier and the release half of the acq_rel atomic;
the last program's acquire half orders its loads after every other program's ticket, and
it loads the partials with the .cg modifier (from L2, not the incoherent L1). The
interpreter (TRITON_INTERPRET=1, used by the tests) runs programs one after another, so
it checks the logic, not the ordering; the ordering is checked on a GPU.
Backward is elementwise: d_x[b, t] = grad * w_b * dl/dx[b, t]. The per-token math mirrors
csrc/include/rlhf/ppo.h.
"""

import torch
import triton
import triton.language as tl

from rlhf_kernels._layout import POLICY_PARTS, POLICY_STATS, VALUE_PARTS, VALUE_STATS
from rlhf_kernels.triton import _common
from rlhf_kernels.triton._op import DifferentiableOp, Op


def _index(names, name):
    return tl.constexpr(names.index(name))


# the layouts of rlhf_kernels/_layout.py (csrc/include/rlhf/layout.h), as kernel constants
N_POLICY_PARTS = tl.constexpr(len(POLICY_PARTS))
N_VALUE_PARTS = tl.constexpr(len(VALUE_PARTS))
PP_LOSS, PP_COUNT, PP_LOW, PP_HIGH, PP_DUAL, PP_KL, PP_RATIO, PP_MIN, PP_MAX = (
    _index(POLICY_PARTS, n) for n in ("loss", "count", "low", "high", "dual", "kl", "ratio", "ratio_min", "ratio_max"))
VP_LOSS, VP_COUNT, VP_CLIPPED, VP_MEAN_R, VP_M2_R, VP_MEAN_E, VP_M2_E = (
    _index(VALUE_PARTS, n) for n in ("loss", "count", "clipped", "mean_r", "m2_r", "mean_err", "m2_err"))
S_CLIPFRAC, S_LOW, S_HIGH, S_DUAL, S_KL, S_RATIO, S_MIN, S_MAX = (
    _index(POLICY_STATS, n) for n in ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                                      "ratio_mean", "ratio_min", "ratio_max"))
S_VF_CLIPFRAC, S_EXPLAINED_VAR = (_index(VALUE_STATS, n) for n in ("vf_clipfrac", "explained_var"))


def _block(n):
    return _common.block(n, 1024, 64, floor=16)


@triton.jit
def _policy_token(logp, old_logp, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr):
    log_ratio = logp - old_logp
    ratio = tl.exp(log_ratio)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    l = tl.maximum(unclipped, clipped)
    dlogp = tl.where(unclipped >= clipped, -adv * ratio, 0.0)
    clip_wins = clipped > unclipped
    is_low = clip_wins & (ratio < lo)
    is_high = clip_wins & (ratio > hi)
    if HAS_DUAL:
        cap = -adv * dual_clip
        is_dual = (adv < 0.0) & (cap < l)
        l = tl.where(is_dual, cap, l)
        dlogp = tl.where(is_dual, 0.0, dlogp)
    else:
        is_dual = adv != adv  # all false
    kl = (ratio - 1.0) - log_ratio
    return l, dlogp, ratio, kl, is_low, is_high, is_dual


@triton.jit
def _policy_row(logp_ptr, old_ptr, adv_ptr, mask_ptr, parts_ptr, row, T, clip_low, clip_high, dual_clip,
                HAS_DUAL: tl.constexpr, BLOCK: tl.constexpr):
    # stores row `row`'s partials in parts_ptr[row, :] (arguments as _policy_fwd_kernel)
    offs = tl.arange(0, BLOCK)
    s_loss = tl.zeros((BLOCK,), tl.float64)
    s_cnt = tl.zeros((BLOCK,), tl.float64)
    s_low = tl.zeros((BLOCK,), tl.float64)
    s_high = tl.zeros((BLOCK,), tl.float64)
    s_dual = tl.zeros((BLOCK,), tl.float64)
    s_kl = tl.zeros((BLOCK,), tl.float64)
    s_ratio = tl.zeros((BLOCK,), tl.float64)
    r_min = tl.full((BLOCK,), float("inf"), tl.float32)
    r_max = tl.full((BLOCK,), -float("inf"), tl.float32)
    for start in range(0, T, BLOCK):
        t = start + offs
        inb = t < T
        idx = row * T + t
        valid = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
        logp = tl.load(logp_ptr + idx, mask=valid, other=0.0)
        old = tl.load(old_ptr + idx, mask=valid, other=0.0)
        adv = tl.load(adv_ptr + idx, mask=valid, other=0.0)
        l, _, ratio, kl, is_low, is_high, is_dual = _policy_token(logp, old, adv, clip_low, clip_high, dual_clip,
                                                                  HAS_DUAL)
        s_loss += tl.where(valid, l, 0.0).to(tl.float64)
        s_cnt += tl.where(valid, 1.0, 0.0).to(tl.float64)
        s_low += tl.where(valid & is_low, 1.0, 0.0).to(tl.float64)
        s_high += tl.where(valid & is_high, 1.0, 0.0).to(tl.float64)
        s_dual += tl.where(valid & is_dual, 1.0, 0.0).to(tl.float64)
        s_kl += tl.where(valid, kl, 0.0).to(tl.float64)
        s_ratio += tl.where(valid, ratio, 0.0).to(tl.float64)
        r_min = tl.minimum(r_min, tl.where(valid, ratio, float("inf")))
        r_max = tl.maximum(r_max, tl.where(valid, ratio, -float("inf")))
    out = parts_ptr + row * N_POLICY_PARTS
    tl.store(out + PP_LOSS, tl.sum(s_loss, 0))
    tl.store(out + PP_COUNT, tl.sum(s_cnt, 0))
    tl.store(out + PP_LOW, tl.sum(s_low, 0))
    tl.store(out + PP_HIGH, tl.sum(s_high, 0))
    tl.store(out + PP_DUAL, tl.sum(s_dual, 0))
    tl.store(out + PP_KL, tl.sum(s_kl, 0))
    tl.store(out + PP_RATIO, tl.sum(s_ratio, 0))
    tl.store(out + PP_MIN, tl.min(r_min, 0).to(tl.float64))
    tl.store(out + PP_MAX, tl.max(r_max, 0).to(tl.float64))


@triton.jit
def _row_weight(count, total, rows_with, numel, num_tokens, AGG: tl.constexpr, HAS_NT: tl.constexpr):
    # weight of each token of a row in the aggregated loss; mirrors ppo_row_weight in rlhf/ppo.h
    if AGG == 0:
        if HAS_NT:
            denom = num_tokens + count * 0.0
        else:
            denom = total + count * 0.0
    elif AGG == 1:
        denom = count * rows_with
    elif AGG == 2:
        denom = rows_with + count * 0.0
    else:
        denom = numel + count * 0.0
    return tl.where(count > 0, 1.0 / tl.where(count > 0, denom, 1.0), 0.0)


@triton.jit
def _last_to_arrive(counter_ptr):
    # True in the one program that draws the last ticket. The barrier orders the stores of
    # all threads of this program before the (single-thread) atomic, whose release half
    # publishes them; its acquire half, in the last program, orders the combine's loads
    # after every other program's ticket (Triton broadcasts a scalar atomic's result
    # through shared memory behind a barrier, which extends this to all threads).
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == tl.num_programs(0) - 1


@triton.jit
def _policy_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel,
                    AGG: tl.constexpr, HAS_NT: tl.constexpr, BLOCK: tl.constexpr):
    # run by the last program only; partials written by other programs are loaded with .cg
    offs = tl.arange(0, BLOCK)
    a_cnt = tl.zeros((BLOCK,), tl.float64)
    a_rows = tl.zeros((BLOCK,), tl.float64)
    a_low = tl.zeros((BLOCK,), tl.float64)
    a_high = tl.zeros((BLOCK,), tl.float64)
    a_dual = tl.zeros((BLOCK,), tl.float64)
    a_kl = tl.zeros((BLOCK,), tl.float64)
    a_ratio = tl.zeros((BLOCK,), tl.float64)
    a_min = tl.full((BLOCK,), float("inf"), tl.float64)
    a_max = tl.full((BLOCK,), -float("inf"), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + offs
        inb = b < B
        p = parts_ptr + b * N_POLICY_PARTS
        cnt = tl.load(p + PP_COUNT, mask=inb, other=0.0, cache_modifier=".cg")
        a_cnt += cnt
        a_rows += tl.where(cnt > 0, 1.0, 0.0)
        a_low += tl.load(p + PP_LOW, mask=inb, other=0.0, cache_modifier=".cg")
        a_high += tl.load(p + PP_HIGH, mask=inb, other=0.0, cache_modifier=".cg")
        a_dual += tl.load(p + PP_DUAL, mask=inb, other=0.0, cache_modifier=".cg")
        a_kl += tl.load(p + PP_KL, mask=inb, other=0.0, cache_modifier=".cg")
        a_ratio += tl.load(p + PP_RATIO, mask=inb, other=0.0, cache_modifier=".cg")
        a_min = tl.minimum(a_min, tl.load(p + PP_MIN, mask=inb, other=float("inf"), cache_modifier=".cg"))
        a_max = tl.maximum(a_max, tl.load(p + PP_MAX, mask=inb, other=-float("inf"), cache_modifier=".cg"))
    total = tl.sum(a_cnt, 0)
    rows_with = tl.sum(a_rows, 0)
    if HAS_NT:
        nt = tl.load(num_tokens_ptr)
    else:
        nt = total
    a_loss = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + offs
        inb = b < B
        p = parts_ptr + b * N_POLICY_PARTS
        cnt = tl.load(p + PP_COUNT, mask=inb, other=0.0, cache_modifier=".cg")
        w = _row_weight(cnt, total, rows_with, numel, nt, AGG, HAS_NT)
        a_loss += w * tl.load(p + PP_LOSS, mask=inb, other=0.0, cache_modifier=".cg")
        tl.store(scale_ptr + b, w.to(tl.float32), mask=inb)
    tl.store(loss_ptr, tl.sum(a_loss, 0).to(tl.float32))
    n = tl.maximum(total, 1.0)
    low = tl.sum(a_low, 0)
    high = tl.sum(a_high, 0)
    tl.store(stats_ptr + S_CLIPFRAC, ((low + high) / n).to(tl.float32))
    tl.store(stats_ptr + S_LOW, (low / n).to(tl.float32))
    tl.store(stats_ptr + S_HIGH, (high / n).to(tl.float32))
    tl.store(stats_ptr + S_DUAL, (tl.sum(a_dual, 0) / n).to(tl.float32))
    tl.store(stats_ptr + S_KL, (tl.sum(a_kl, 0) / n).to(tl.float32))
    tl.store(stats_ptr + S_RATIO, (tl.sum(a_ratio, 0) / n).to(tl.float32))
    tl.store(stats_ptr + S_MIN, tl.where(total > 0, tl.min(a_min, 0), 0.0).to(tl.float32))
    tl.store(stats_ptr + S_MAX, tl.where(total > 0, tl.max(a_max, 0), 0.0).to(tl.float32))


@triton.jit
def _policy_fwd_kernel(
    logp_ptr,        # [B, T] float32
    old_ptr,         # [B, T] float32
    adv_ptr,         # [B, T] float32
    mask_ptr,        # [B, T] int8 (0/1)
    parts_ptr,       # [max(B, 1), N_POLICY_PARTS] float64 scratch: row partials
    counter_ptr,     # [] int32, zero at launch: tickets; reset to zero by the last program (so a
                     # cached counter is zero again for the next call on its stream)
    num_tokens_ptr,  # [] float64, read only when HAS_NT
    loss_ptr,        # [] float32 out
    stats_ptr,       # [len(POLICY_STATS)] float32 out
    scale_ptr,       # [B] float32 out: row weights
    B, T, numel, clip_low, clip_high, dual_clip,
    HAS_DUAL: tl.constexpr, AGG: tl.constexpr, HAS_NT: tl.constexpr,
    BLOCK: tl.constexpr,          # tile over T in the row pass
    COMBINE_BLOCK: tl.constexpr,  # tile over B in the combine
):
    # grid (max(B, 1),): with B == 0 the one program only combines (loss 0, stats 0)
    row = tl.program_id(0).to(tl.int64)
    if row < B:
        _policy_row(logp_ptr, old_ptr, adv_ptr, mask_ptr, parts_ptr, row, T, clip_low, clip_high, dual_clip,
                    HAS_DUAL, BLOCK)
    if _last_to_arrive(counter_ptr):
        _policy_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel, AGG, HAS_NT,
                        COMBINE_BLOCK)
        tl.store(counter_ptr, 0)


@triton.jit
def _policy_bwd_kernel(
    grad_ptr,      # [] float32: d loss
    logp_ptr, old_ptr, adv_ptr,  # [B, T] float32
    mask_ptr,      # [B, T] int8
    scale_ptr,     # [B] float32 row weights
    out_ptr,       # [B, T] float32 out: d logprobs
    T, clip_low, clip_high, dual_clip,
    HAS_DUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = t < T
    idx = row * T + t
    valid = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
    logp = tl.load(logp_ptr + idx, mask=valid, other=0.0)
    old = tl.load(old_ptr + idx, mask=valid, other=0.0)
    adv = tl.load(adv_ptr + idx, mask=valid, other=0.0)
    _, dlogp, _, _, _, _, _ = _policy_token(logp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
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
    offs = tl.arange(0, BLOCK)
    s_loss = tl.zeros((BLOCK,), tl.float64)
    s_cnt = tl.zeros((BLOCK,), tl.float64)
    s_clip = tl.zeros((BLOCK,), tl.float64)
    s_r = tl.zeros((BLOCK,), tl.float64)
    s_e = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, T, BLOCK):
        t = start + offs
        inb = t < T
        idx = row * T + t
        valid = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
        v = tl.load(v_ptr + idx, mask=valid, other=0.0)
        o = tl.load(old_ptr + idx, mask=valid, other=0.0)
        r = tl.load(ret_ptr + idx, mask=valid, other=0.0)
        l, _, is_clipped = _value_token(v, o, r, clip, HAS_CLIP)
        s_loss += tl.where(valid, l, 0.0).to(tl.float64)
        s_cnt += tl.where(valid, 1.0, 0.0).to(tl.float64)
        s_clip += tl.where(valid & is_clipped, 1.0, 0.0).to(tl.float64)
        s_r += tl.where(valid, r, 0.0).to(tl.float64)
        s_e += tl.where(valid, r.to(tl.float64) - v.to(tl.float64), 0.0)
    n = tl.sum(s_cnt, 0)
    mean_r = tl.sum(s_r, 0) / tl.maximum(n, 1.0)
    mean_e = tl.sum(s_e, 0) / tl.maximum(n, 1.0)
    q_r = tl.zeros((BLOCK,), tl.float64)
    q_e = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, T, BLOCK):
        t = start + offs
        inb = t < T
        idx = row * T + t
        valid = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
        v = tl.load(v_ptr + idx, mask=valid, other=0.0).to(tl.float64)
        r = tl.load(ret_ptr + idx, mask=valid, other=0.0).to(tl.float64)
        dr = r - mean_r
        de = (r - v) - mean_e
        q_r += tl.where(valid, dr * dr, 0.0)
        q_e += tl.where(valid, de * de, 0.0)
    out = parts_ptr + row * N_VALUE_PARTS
    tl.store(out + VP_LOSS, tl.sum(s_loss, 0))
    tl.store(out + VP_COUNT, n)
    tl.store(out + VP_CLIPPED, tl.sum(s_clip, 0))
    tl.store(out + VP_MEAN_R, mean_r)
    tl.store(out + VP_M2_R, tl.sum(q_r, 0))
    tl.store(out + VP_MEAN_E, mean_e)
    tl.store(out + VP_M2_E, tl.sum(q_e, 0))


@triton.jit
def _value_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel,
                   AGG: tl.constexpr, HAS_NT: tl.constexpr, BLOCK: tl.constexpr):
    # run by the last program only; partials written by other programs are loaded with .cg
    offs = tl.arange(0, BLOCK)
    a_cnt = tl.zeros((BLOCK,), tl.float64)
    a_rows = tl.zeros((BLOCK,), tl.float64)
    a_clip = tl.zeros((BLOCK,), tl.float64)
    a_r = tl.zeros((BLOCK,), tl.float64)
    a_e = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + offs
        inb = b < B
        p = parts_ptr + b * N_VALUE_PARTS
        cnt = tl.load(p + VP_COUNT, mask=inb, other=0.0, cache_modifier=".cg")
        a_cnt += cnt
        a_rows += tl.where(cnt > 0, 1.0, 0.0)
        a_clip += tl.load(p + VP_CLIPPED, mask=inb, other=0.0, cache_modifier=".cg")
        a_r += cnt * tl.load(p + VP_MEAN_R, mask=inb, other=0.0, cache_modifier=".cg")
        a_e += cnt * tl.load(p + VP_MEAN_E, mask=inb, other=0.0, cache_modifier=".cg")
    total = tl.sum(a_cnt, 0)
    rows_with = tl.sum(a_rows, 0)
    n = tl.maximum(total, 1.0)
    mean_r = tl.sum(a_r, 0) / n
    mean_e = tl.sum(a_e, 0) / n
    if HAS_NT:
        nt = tl.load(num_tokens_ptr)
    else:
        nt = total
    a_loss = tl.zeros((BLOCK,), tl.float64)
    m2_r = tl.zeros((BLOCK,), tl.float64)
    m2_e = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, B, BLOCK):
        b = start + offs
        inb = b < B
        p = parts_ptr + b * N_VALUE_PARTS
        cnt = tl.load(p + VP_COUNT, mask=inb, other=0.0, cache_modifier=".cg")
        w = _row_weight(cnt, total, rows_with, numel, nt, AGG, HAS_NT)
        a_loss += w * tl.load(p + VP_LOSS, mask=inb, other=0.0, cache_modifier=".cg")
        tl.store(scale_ptr + b, w.to(tl.float32), mask=inb)
        # total sum of squares = within rows + between rows (exact split)
        dr = tl.load(p + VP_MEAN_R, mask=inb, other=0.0, cache_modifier=".cg") - mean_r
        de = tl.load(p + VP_MEAN_E, mask=inb, other=0.0, cache_modifier=".cg") - mean_e
        m2_r += tl.load(p + VP_M2_R, mask=inb, other=0.0, cache_modifier=".cg") + cnt * dr * dr
        m2_e += tl.load(p + VP_M2_E, mask=inb, other=0.0, cache_modifier=".cg") + cnt * de * de
    tl.store(loss_ptr, tl.sum(a_loss, 0).to(tl.float32))
    tl.store(stats_ptr + S_VF_CLIPFRAC, (tl.sum(a_clip, 0) / n).to(tl.float32))
    var_r = tl.sum(m2_r, 0)
    ev = tl.where(var_r > 0, 1.0 - tl.sum(m2_e, 0) / tl.where(var_r > 0, var_r, 1.0), 0.0)
    tl.store(stats_ptr + S_EXPLAINED_VAR, ev.to(tl.float32))


@triton.jit
def _value_fwd_kernel(
    v_ptr, old_ptr, ret_ptr,   # [B, T] float32
    mask_ptr,                  # [B, T] int8
    parts_ptr,                 # [max(B, 1), N_VALUE_PARTS] float64 scratch: row partials
    counter_ptr,               # [] int32, zero at launch: tickets; reset to zero by the last program
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
    if _last_to_arrive(counter_ptr):
        _value_combine(parts_ptr, num_tokens_ptr, loss_ptr, stats_ptr, scale_ptr, B, numel, AGG, HAS_NT,
                       COMBINE_BLOCK)
        tl.store(counter_ptr, 0)


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
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = t < T
    idx = row * T + t
    valid = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
    v = tl.load(v_ptr + idx, mask=valid, other=0.0)
    o = tl.load(old_ptr + idx, mask=valid, other=0.0)
    r = tl.load(ret_ptr + idx, mask=valid, other=0.0)
    _, dv, _ = _value_token(v, o, r, clip, HAS_CLIP)
    s = tl.load(grad_ptr) * tl.load(scale_ptr + row)
    tl.store(out_ptr + idx, tl.where(valid, s * dv, 0.0), mask=inb)


_counters = {}  # (device index, raw stream) -> [] int32 counter, zero between calls


def _counter(device):
    """The forward's ticket counter, [] int32 zero at launch. On CUDA one is cached per
    (device, stream) and the kernel's last program sets it back to zero, so a call costs no
    fill kernel, and forwards on concurrent streams never share one. A counter first needed
    while a CUDA graph is being captured is made inside the graph (a captured fill) and not
    cached: its memory belongs to the graph's pool. Under the interpreter: a fresh zero."""
    if device.type != "cuda":
        return torch.zeros((), dtype=torch.int32, device=device)
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    counter = _counters.get(key)
    if counter is None:
        counter = torch.zeros((), dtype=torch.int32, device=device)
        if not torch.cuda.is_current_stream_capturing():
            _counters[key] = counter
    return counter


def _outputs(x, n_stats):
    B = x.shape[0]
    return x.new_empty(()), x.new_empty((n_stats,)), x.new_empty((B,))


def _fake_outputs(x, n_stats):
    f32 = dict(dtype=torch.float32)
    return x.new_empty((), **f32), x.new_empty((n_stats,), **f32), x.new_empty((x.shape[0],), **f32)


def _policy_forward(logp, old, adv, mask, num_tokens, clip_low, clip_high, dual_clip, agg):
    """[B, T] float32 contiguous inputs, bool mask; num_tokens a 0-d float64 tensor or None.
    Returns (loss [], stats [len(POLICY_STATS)], row_scale [B])."""
    B, T = logp.shape
    loss, stats, scale = _outputs(logp, len(POLICY_STATS))
    parts = torch.empty((max(B, 1), len(POLICY_PARTS)), dtype=torch.float64, device=logp.device)
    _policy_fwd_kernel[(max(B, 1),)](logp, old, adv, mask.view(torch.int8), parts, _counter(logp.device),
                                     num_tokens if num_tokens is not None else parts, loss, stats, scale, B, T,
                                     float(B * T), clip_low, clip_high, dual_clip or 0.0,
                                     HAS_DUAL=dual_clip is not None, AGG=agg, HAS_NT=num_tokens is not None,
                                     BLOCK=_block(T), COMBINE_BLOCK=_block(B))
    return loss, stats, scale


def _policy_backward(grad, logp, old, adv, mask, scale, clip_low, clip_high, dual_clip):
    B, T = logp.shape
    out = torch.empty_like(logp)
    if logp.numel():
        block = _block(T)
        _policy_bwd_kernel[(B, triton.cdiv(T, block))](grad, logp, old, adv, mask.view(torch.int8), scale, out, T,
                                                       clip_low, clip_high, dual_clip or 0.0,
                                                       HAS_DUAL=dual_clip is not None, BLOCK=block)
    return out


def _value_forward(values, old, returns, mask, num_tokens, clip, agg):
    """Returns (loss [], stats [len(VALUE_STATS)], row_scale [B])."""
    B, T = values.shape
    loss, stats, scale = _outputs(values, len(VALUE_STATS))
    parts = torch.empty((max(B, 1), len(VALUE_PARTS)), dtype=torch.float64, device=values.device)
    _value_fwd_kernel[(max(B, 1),)](values, old, returns, mask.view(torch.int8), parts, _counter(values.device),
                                    num_tokens if num_tokens is not None else parts, loss, stats, scale, B, T,
                                    float(B * T), clip or 0.0, HAS_CLIP=clip is not None, AGG=agg,
                                    HAS_NT=num_tokens is not None, BLOCK=_block(T), COMBINE_BLOCK=_block(B))
    return loss, stats, scale


def _value_backward(grad, values, old, returns, mask, scale, clip):
    B, T = values.shape
    out = torch.empty_like(values)
    if values.numel():
        block = _block(T)
        _value_bwd_kernel[(B, triton.cdiv(T, block))](grad, values, old, returns, mask.view(torch.int8), scale, out,
                                                      T, clip or 0.0, HAS_CLIP=clip is not None, BLOCK=block)
    return out


# ---- the ops (rlhf_kernels/triton/_op.py): float32 contiguous [B, T] inputs and a bool mask,
# checked and converted by rlhf_kernels/ops/ppo.py; the gradient flows to logprobs / values only.

policy_backward = Op(
    "ppo_policy_bwd",
    "(Tensor grad, Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor row_scale, "
    "float clip_low, float clip_high, float? dual_clip) -> Tensor",
    _policy_backward, lambda grad, logp, *rest: torch.empty_like(logp))


def _policy_setup(ctx, inputs, output):
    logp, old, adv, mask, _, clip_low, clip_high, dual_clip, _ = inputs
    ctx.save_for_backward(logp, old, adv, mask, output[2])
    ctx.clip = (clip_low, clip_high, dual_clip)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _policy_grad(ctx, grad_loss, grad_stats, grad_scale):
    if grad_loss is None:
        return (None,) * 9
    logp, old, adv, mask, scale = ctx.saved_tensors
    d = policy_backward(grad_loss.float().contiguous(), logp, old, adv, mask, scale, *ctx.clip)
    return (d,) + (None,) * 8


policy_forward = DifferentiableOp(
    "ppo_policy_fwd",
    "(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor? num_tokens, float clip_low, "
    "float clip_high, float? dual_clip, int loss_agg) -> (Tensor, Tensor, Tensor)",
    _policy_forward, lambda logp, *rest: _fake_outputs(logp, len(POLICY_STATS)), _policy_setup, _policy_grad)

value_backward = Op(
    "ppo_value_bwd",
    "(Tensor grad, Tensor values, Tensor old_values, Tensor returns, Tensor mask, Tensor row_scale, float? clip) "
    "-> Tensor",
    _value_backward, lambda grad, values, *rest: torch.empty_like(values))


def _value_setup(ctx, inputs, output):
    values, old, returns, mask, _, clip, _ = inputs
    ctx.save_for_backward(values, old, returns, mask, output[2])
    ctx.clip = clip
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _value_grad(ctx, grad_loss, grad_stats, grad_scale):
    if grad_loss is None:
        return (None,) * 7
    values, old, returns, mask, scale = ctx.saved_tensors
    d = value_backward(grad_loss.float().contiguous(), values, old, returns, mask, scale, ctx.clip)
    return (d,) + (None,) * 6


value_forward = DifferentiableOp(
    "ppo_value_fwd",
    "(Tensor values, Tensor old_values, Tensor returns, Tensor mask, Tensor? num_tokens, float? clip, "
    "int loss_agg) -> (Tensor, Tensor, Tensor)",
    _value_forward, lambda values, *rest: _fake_outputs(values, len(VALUE_STATS)), _value_setup, _value_grad)
