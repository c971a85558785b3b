"""PPO policy and value losses in Triton.

Forward, one launch per loss (_policy_fwd_kernel / _value_fwd_kernel), max(B, 1)
programs: program b walks row b in tiles and stores float64 partial sums in `parts`,
then draws a ticket from an int32 counter (_last_to_arrive); the program that draws the
last ticket combines all rows in a fixed order and writes the loss, the statistics and
each row's weight w_b in the aggregated loss (loss = sum_b w_b * sum_t l_bt). Which
program comes last varies between runs but the combine order does not, so the results
are bitwise the same on every run (the only atomic is the integer ticket). The counter is
a fresh torch.zeros per call, never shared between calls on different streams; on a CUDA
tensor torch fills it with a small kernel (PyTorch has no async memset in Python), so a
CUDA forward is that fill plus the one Triton launch (the compiled CUDA op uses a memset).
Memory ordering (the "last block" pattern): each program's stores of its partials are
ordered before its ticket by a CTA barrier and the release half of the acq_rel atomic;
the last program's acquire half orders its loads after every other program's ticket, and
it loads the partials with the .cg modifier (from L2, not the incoherent L1). The
interpreter (TRITON_INTERPRET=1, used by the tests) runs programs one after another, so
it checks the logic, not the ordering; the ordering is checked on a GPU.
Backward is elementwise: d_x[b, t] = grad * w_b * dl/dx[b, t]. The per-token math mirrors
csrc/include/rlhf/ppo.h.
"""

import os

import torch
import triton
import triton.language as tl

N_POLICY_PARTS = 9   # loss, count, clip_low, clip_high, dual, kl, ratio, ratio_min, ratio_max
N_VALUE_PARTS = 7    # loss, count, clipped, mean_R, M2_R, mean_err, M2_err   (err = R - V)


def _block(n):
    cap = 64 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


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
    out = parts_ptr + row * 9
    tl.store(out + 0, tl.sum(s_loss, 0))
    tl.store(out + 1, tl.sum(s_cnt, 0))
    tl.store(out + 2, tl.sum(s_low, 0))
    tl.store(out + 3, tl.sum(s_high, 0))
    tl.store(out + 4, tl.sum(s_dual, 0))
    tl.store(out + 5, tl.sum(s_kl, 0))
    tl.store(out + 6, tl.sum(s_ratio, 0))
    tl.store(out + 7, tl.min(r_min, 0).to(tl.float64))
    tl.store(out + 8, tl.max(r_max, 0).to(tl.float64))


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
        p = parts_ptr + b * 9
        cnt = tl.load(p + 1, mask=inb, other=0.0, cache_modifier=".cg")
        a_cnt += cnt
        a_rows += tl.where(cnt > 0, 1.0, 0.0)
        a_low += tl.load(p + 2, mask=inb, other=0.0, cache_modifier=".cg")
        a_high += tl.load(p + 3, mask=inb, other=0.0, cache_modifier=".cg")
        a_dual += tl.load(p + 4, mask=inb, other=0.0, cache_modifier=".cg")
        a_kl += tl.load(p + 5, mask=inb, other=0.0, cache_modifier=".cg")
        a_ratio += tl.load(p + 6, mask=inb, other=0.0, cache_modifier=".cg")
        a_min = tl.minimum(a_min, tl.load(p + 7, mask=inb, other=float("inf"), cache_modifier=".cg"))
        a_max = tl.maximum(a_max, tl.load(p + 8, mask=inb, other=-float("inf"), cache_modifier=".cg"))
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
        cnt = tl.load(parts_ptr + b * 9 + 1, mask=inb, other=0.0, cache_modifier=".cg")
        w = _row_weight(cnt, total, rows_with, numel, nt, AGG, HAS_NT)
        a_loss += w * tl.load(parts_ptr + b * 9, mask=inb, other=0.0, cache_modifier=".cg")
        tl.store(scale_ptr + b, w.to(tl.float32), mask=inb)
    tl.store(loss_ptr, tl.sum(a_loss, 0).to(tl.float32))
    n = tl.maximum(total, 1.0)
    low = tl.sum(a_low, 0)
    high = tl.sum(a_high, 0)
    tl.store(stats_ptr + 0, ((low + high) / n).to(tl.float32))
    tl.store(stats_ptr + 1, (low / n).to(tl.float32))
    tl.store(stats_ptr + 2, (high / n).to(tl.float32))
    tl.store(stats_ptr + 3, (tl.sum(a_dual, 0) / n).to(tl.float32))
    tl.store(stats_ptr + 4, (tl.sum(a_kl, 0) / n).to(tl.float32))
    tl.store(stats_ptr + 5, (tl.sum(a_ratio, 0) / n).to(tl.float32))
    tl.store(stats_ptr + 6, tl.where(total > 0, tl.min(a_min, 0), 0.0).to(tl.float32))
    tl.store(stats_ptr + 7, tl.where(total > 0, tl.max(a_max, 0), 0.0).to(tl.float32))


@triton.jit
def _policy_fwd_kernel(
    logp_ptr,        # [B, T] float32
    old_ptr,         # [B, T] float32
    adv_ptr,         # [B, T] float32
    mask_ptr,        # [B, T] int8 (0/1)
    parts_ptr,       # [max(B, 1), 9] float64 scratch: row partials (N_POLICY_PARTS)
    counter_ptr,     # [] int32, zero at launch: tickets; reset to zero by the last program
    num_tokens_ptr,  # [] float64, read only when HAS_NT
    loss_ptr,        # [] float32 out
    stats_ptr,       # [8] float32 out (POLICY_STATS order)
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
    out = parts_ptr + row * 7
    tl.store(out + 0, tl.sum(s_loss, 0))
    tl.store(out + 1, n)
    tl.store(out + 2, tl.sum(s_clip, 0))
    tl.store(out + 3, mean_r)
    tl.store(out + 4, tl.sum(q_r, 0))
    tl.store(out + 5, mean_e)
    tl.store(out + 6, tl.sum(q_e, 0))


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
        p = parts_ptr + b * 7
        cnt = tl.load(p + 1, mask=inb, other=0.0, cache_modifier=".cg")
        a_cnt += cnt
        a_rows += tl.where(cnt > 0, 1.0, 0.0)
        a_clip += tl.load(p + 2, mask=inb, other=0.0, cache_modifier=".cg")
        a_r += cnt * tl.load(p + 3, mask=inb, other=0.0, cache_modifier=".cg")
        a_e += cnt * tl.load(p + 5, mask=inb, other=0.0, cache_modifier=".cg")
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
        p = parts_ptr + b * 7
        cnt = tl.load(p + 1, mask=inb, other=0.0, cache_modifier=".cg")
        w = _row_weight(cnt, total, rows_with, numel, nt, AGG, HAS_NT)
        a_loss += w * tl.load(p, mask=inb, other=0.0, cache_modifier=".cg")
        tl.store(scale_ptr + b, w.to(tl.float32), mask=inb)
        # total sum of squares = within rows + between rows (exact split)
        dr = tl.load(p + 3, mask=inb, other=0.0, cache_modifier=".cg") - mean_r
        de = tl.load(p + 5, mask=inb, other=0.0, cache_modifier=".cg") - mean_e
        m2_r += tl.load(p + 4, mask=inb, other=0.0, cache_modifier=".cg") + cnt * dr * dr
        m2_e += tl.load(p + 6, mask=inb, other=0.0, cache_modifier=".cg") + cnt * de * de
    tl.store(loss_ptr, tl.sum(a_loss, 0).to(tl.float32))
    tl.store(stats_ptr, (tl.sum(a_clip, 0) / n).to(tl.float32))
    var_r = tl.sum(m2_r, 0)
    ev = tl.where(var_r > 0, 1.0 - tl.sum(m2_e, 0) / tl.where(var_r > 0, var_r, 1.0), 0.0)
    tl.store(stats_ptr + 1, ev.to(tl.float32))


@triton.jit
def _value_fwd_kernel(
    v_ptr, old_ptr, ret_ptr,   # [B, T] float32
    mask_ptr,                  # [B, T] int8
    parts_ptr,                 # [max(B, 1), 7] float64 scratch: row partials (N_VALUE_PARTS)
    counter_ptr,               # [] int32, zero at launch: tickets; reset to zero by the last program
    num_tokens_ptr,            # [] float64, read only when HAS_NT
    loss_ptr,                  # [] float32 out
    stats_ptr,                 # [2] float32 out: vf_clipfrac, explained_var
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


def _counter(device):
    # the forward's ticket counter, [] int32 zero: one per call, so forwards on concurrent
    # streams never share one (on CUDA, torch.zeros runs a 4-byte fill kernel)
    return torch.zeros((), dtype=torch.int32, device=device)


def _outputs(x, n_stats):
    B = x.shape[0]
    return x.new_empty(()), x.new_empty((n_stats,)), x.new_empty((B,))


def policy_forward(logp, old, adv, mask, num_tokens, clip_low, clip_high, dual_clip, agg):
    """[B, T] float32 contiguous inputs, bool mask; num_tokens a 0-d float64 tensor or None.
    Returns (loss [], stats [8], row_scale [B])."""
    B, T = logp.shape
    loss, stats, scale = _outputs(logp, 8)
    parts = torch.empty((max(B, 1), N_POLICY_PARTS), dtype=torch.float64, device=logp.device)
    counter = _counter(logp.device)
    _policy_fwd_kernel[(max(B, 1),)](logp, old, adv, mask.view(torch.int8), parts, counter,
                                     num_tokens if num_tokens is not None else parts, loss, stats, scale, B, T,
                                     float(B * T), clip_low, clip_high, dual_clip or 0.0,
                                     HAS_DUAL=dual_clip is not None, AGG=agg, HAS_NT=num_tokens is not None,
                                     BLOCK=_block(T), COMBINE_BLOCK=_block(B))
    return loss, stats, scale


def policy_backward(grad, logp, old, adv, mask, scale, clip_low, clip_high, dual_clip):
    B, T = logp.shape
    out = torch.empty_like(logp)
    if logp.numel():
        block = _block(T)
        _policy_bwd_kernel[(B, triton.cdiv(T, block))](grad, logp, old, adv, mask.view(torch.int8), scale, out, T,
                                                       clip_low, clip_high, dual_clip or 0.0,
                                                       HAS_DUAL=dual_clip is not None, BLOCK=block)
    return out


def value_forward(values, old, returns, mask, num_tokens, clip, agg):
    """Returns (loss [], stats [2], row_scale [B])."""
    B, T = values.shape
    loss, stats, scale = _outputs(values, 2)
    parts = torch.empty((max(B, 1), N_VALUE_PARTS), dtype=torch.float64, device=values.device)
    counter = _counter(values.device)
    _value_fwd_kernel[(max(B, 1),)](values, old, returns, mask.view(torch.int8), parts, counter,
                                    num_tokens if num_tokens is not None else parts, loss, stats, scale, B, T,
                                    float(B * T), clip or 0.0, HAS_CLIP=clip is not None, AGG=agg,
                                    HAS_NT=num_tokens is not None, BLOCK=_block(T), COMBINE_BLOCK=_block(B))
    return loss, stats, scale


def value_backward(grad, values, old, returns, mask, scale, clip):
    B, T = values.shape
    out = torch.empty_like(values)
    if values.numel():
        block = _block(T)
        _value_bwd_kernel[(B, triton.cdiv(T, block))](grad, values, old, returns, mask.view(torch.int8), scale, out,
                                                      T, clip or 0.0, HAS_CLIP=clip is not None, BLOCK=block)
    return out


class PPOPolicyLoss(torch.autograd.Function):
    """(logprobs, old_logprobs, advantages, mask, num_tokens, clip_low, clip_high, dual_clip, agg)
    -> (loss, stats [8]); gradient wrt logprobs only."""

    @staticmethod
    def forward(ctx, logp, old, adv, mask, num_tokens, clip_low, clip_high, dual_clip, agg):
        loss, stats, scale = policy_forward(logp, old, adv, mask, num_tokens, clip_low, clip_high, dual_clip, agg)
        ctx.save_for_backward(logp, old, adv, mask, scale)
        ctx.clip = (clip_low, clip_high, dual_clip)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        logp, old, adv, mask, scale = ctx.saved_tensors
        d = policy_backward(grad_loss.float().contiguous(), logp, old, adv, mask, scale, *ctx.clip)
        return d, None, None, None, None, None, None, None, None


class PPOValueLoss(torch.autograd.Function):
    """(values, old_values, returns, mask, num_tokens, clip, agg) -> (loss, stats [2]);
    gradient wrt values only."""

    @staticmethod
    def forward(ctx, values, old, returns, mask, num_tokens, clip, agg):
        loss, stats, scale = value_forward(values, old, returns, mask, num_tokens, clip, agg)
        ctx.save_for_backward(values, old, returns, mask, scale)
        ctx.clip = clip
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        values, old, returns, mask, scale = ctx.saved_tensors
        d = value_backward(grad_loss.float().contiguous(), values, old, returns, mask, scale, ctx.clip)
        return d, None, None, None, None, None, None
