"""GAE and masked whitening in Triton.

GAE as a scan over affine maps: with scan index k running backwards in time
(t = tile_end - 1 - k), step t is the map x -> a_t*x + b_t and
    A_t = b_t + a_t * A_{next},   a_t = gamma*lam, b_t = delta_t   (unmasked)
                                  a_t = 1,         b_t = 0         (masked: identity)
``tl.associative_scan`` composes the maps of a tile; a carry links tiles, so any T works.
The "value of the next unmasked step" is a first scan of selection maps
x -> m_{t+1} ? V_{t+1} : x. The advantage scan runs in float64, which keeps
gamma*lam = 1 over 128k steps within 1e-6 of exact.
"""

import struct

import torch
import triton
import triton.language as tl

from rlhf_kernels.triton._common import INTERPRET
from rlhf_kernels.triton._op import Op


@triton.jit
def _compose(a_inner, b_inner, a_outer, b_outer):
    # scan order = backwards in time, so the later element is the outer map
    return a_outer * a_inner, b_outer + a_outer * b_inner


@triton.jit
def _gae_kernel(
    rewards_ptr,      # [N] float32, rows laid end to end
    values_ptr,       # [N] float32
    mask_ptr,         # [N] int8 (0/1); read only when HAS_MASK
    cu_seqlens_ptr,   # [B+1] int64 row offsets; read only when PACKED, else row b is [b*T, (b+1)*T)
    last_values_ptr,  # [B] float32, value after each row's last step; read only when HAS_LAST
    gamma_bits,       # int64: the bits of gamma as a float64 (a float argument would be float32)
    lam_bits,         # int64: the bits of lam as a float64
    adv_ptr,          # [N] float32 out: advantages
    ret_ptr,          # [N] float32 out: returns
    T,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PACKED:
        start = tl.load(cu_seqlens_ptr + row)
        end = tl.load(cu_seqlens_ptr + row + 1)
    else:
        start = row * T
        end = start + T
    if HAS_LAST:
        carry_v = tl.load(last_values_ptr + row).to(tl.float32)
    else:
        carry_v = tl.zeros((), tl.float32)
    carry_a = tl.zeros((), tl.float64)
    g = gamma_bits.to(tl.int64).to(tl.float64, bitcast=True)
    gl = g * lam_bits.to(tl.int64).to(tl.float64, bitcast=True)
    k = tl.arange(0, BLOCK)
    n_tiles = tl.cdiv(end - start, BLOCK)
    for i in range(0, n_tiles):
        tile_end = end - i * BLOCK
        t = tile_end - 1 - k
        in_tile = t >= start

        # scan 1: value of the next unmasked step
        nxt = t + 1
        has_next = in_tile & (nxt < end)
        if HAS_MASK:
            has_next = has_next & (tl.load(mask_ptr + nxt, mask=has_next, other=0) != 0)
        v_next = tl.load(values_ptr + nxt, mask=has_next, other=0.0)
        a1 = tl.where(has_next, 0.0, 1.0)
        b1 = tl.where(has_next, v_next, 0.0)
        a1, b1 = tl.associative_scan((a1, b1), 0, _compose)
        next_v = b1 + a1 * carry_v
        carry_v = tl.sum(tl.where(t == tl.maximum(tile_end - BLOCK, start), next_v, 0.0), 0)

        # scan 2: advantages, in float64
        valid = in_tile
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + t, mask=in_tile, other=0) != 0)
        r = tl.load(rewards_ptr + t, mask=in_tile, other=0.0).to(tl.float64)
        v = tl.load(values_ptr + t, mask=in_tile, other=0.0).to(tl.float64)
        delta = r + g * next_v.to(tl.float64) - v
        a2 = tl.where(valid, gl, 1.0)
        b2 = tl.where(valid, delta, 0.0)
        a2, b2 = tl.associative_scan((a2, b2), 0, _compose)
        adv = b2 + a2 * carry_a
        carry_a = tl.sum(tl.where(t == tl.maximum(tile_end - BLOCK, start), adv, 0.0), 0)
        tl.store(adv_ptr + t, tl.where(valid, adv, 0.0).to(tl.float32), mask=in_tile)
        tl.store(ret_ptr + t, tl.where(valid, adv + v, 0.0).to(tl.float32), mask=in_tile)


def _block():
    return 64 if INTERPRET else 1024  # small interpreter tiles exercise the carry between tiles


def _bits(x):
    # a float64 passed to the kernel as its int64 bit pattern: no tensor to copy to the device
    # (a host-to-device copy would sync and could not be captured in a CUDA graph)
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _launch(rewards, values, mask, cu_seqlens, last_values, gamma, lam, B, T):
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    if B == 0 or rewards.numel() == 0:
        return adv, ret
    dummy = rewards  # stands in for absent optional pointers (never read)
    _gae_kernel[(B,)](
        rewards, values,
        mask.view(torch.int8) if mask is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy,
        last_values if last_values is not None else dummy,
        _bits(gamma), _bits(lam),
        adv, ret, T,
        PACKED=cu_seqlens is not None, HAS_MASK=mask is not None, HAS_LAST=last_values is not None,
        BLOCK=_block(), num_warps=4,
    )
    return adv, ret


def _gae(rewards, values, mask, last_values, gamma, lam):
    """rewards, values: [B, T] float32 contiguous; mask: [B, T] bool; last_values: [B] float32 or None."""
    B, T = rewards.shape
    return _launch(rewards, values, mask, None, last_values, gamma, lam, B, T)


def _gae_packed(rewards, values, cu_seqlens, last_values, mask, gamma, lam):
    """rewards, values: [N] float32; cu_seqlens: [B+1] int64 (validated); mask: [N] bool or None."""
    return _launch(rewards, values, mask, cu_seqlens, last_values, gamma, lam, cu_seqlens.numel() - 1, 0)


gae = Op("gae", _gae)
gae_packed = Op("gae_packed", _gae_packed)


@triton.jit
def _whiten_stats_kernel(
    x_ptr,      # [n] float32
    mask_ptr,   # [n] int8 (0/1)
    stats_ptr,  # [3] float64 out: mean, 1/std, value added back
    n, eps, SHIFT_MEAN: tl.constexpr, UNBIASED: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program, fixed-order float64 sums: deterministic, no atomics
    offs = tl.arange(0, BLOCK)
    s = tl.zeros((BLOCK,), tl.float64)
    c = tl.zeros((BLOCK,), tl.float64)
    for i in range(0, tl.cdiv(n, BLOCK)):
        idx = i * BLOCK + offs
        inb = idx < n
        m = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
        x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float64)
        s += tl.where(m, x, 0.0)
        c += tl.where(m, 1.0, 0.0)
    total = tl.sum(s, 0)
    count = tl.sum(c, 0)
    mean = tl.where(count > 0, total / tl.maximum(count, 1.0), 0.0)
    q = tl.zeros((BLOCK,), tl.float64)
    for i in range(0, tl.cdiv(n, BLOCK)):
        idx = i * BLOCK + offs
        inb = idx < n
        m = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
        d = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float64) - mean
        q += tl.where(m, d * d, 0.0)
    sq = tl.sum(q, 0)
    if UNBIASED:
        denom = count - 1.0
    else:
        denom = count
    var = tl.where(denom > 0, sq / tl.maximum(denom, 1.0), 0.0)
    inv_std = 1.0 / tl.sqrt(var + eps)
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, inv_std)
    if SHIFT_MEAN:
        tl.store(stats_ptr + 2, tl.zeros((), tl.float64))
    else:
        tl.store(stats_ptr + 2, mean)


@triton.jit
def _whiten_apply_kernel(
    x_ptr,      # [n] float32
    mask_ptr,   # [n] int8 (0/1)
    stats_ptr,  # [3] float64: mean, 1/std, value added back
    out_ptr,    # [n] float32 out
    n, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    m = inb & (tl.load(mask_ptr + idx, mask=inb, other=0) != 0)
    x = tl.load(x_ptr + idx, mask=inb, other=0.0).to(tl.float64)
    mean = tl.load(stats_ptr)
    inv_std = tl.load(stats_ptr + 1)
    add_back = tl.load(stats_ptr + 2)
    y = (x - mean) * inv_std + add_back
    tl.store(out_ptr + idx, tl.where(m, y, 0.0).to(tl.float32), mask=inb)


def _masked_whiten(x, mask, shift_mean, unbiased, eps):
    """x: float32 contiguous; mask: bool, same shape."""
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    stats = torch.empty(3, dtype=torch.float64, device=x.device)
    m8 = mask.view(torch.int8)
    _whiten_stats_kernel[(1,)](x, m8, stats, n, float(eps), SHIFT_MEAN=bool(shift_mean),
                               UNBIASED=bool(unbiased), BLOCK=1024)
    block = 1024
    _whiten_apply_kernel[(triton.cdiv(n, block),)](x, m8, stats, out, n, BLOCK=block)
    return out


masked_whiten = Op("masked_whiten", _masked_whiten)
