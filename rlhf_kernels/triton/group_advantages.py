"""Critic-free advantages (grpo, dr_grpo, rloo, reinforce++) in Triton.

Per group, in float64: n, mean and m2 = sum (r - mean)^2 (two passes); then every mode is
    adv = (r - center) * scale        (rlhf/group_advantages.h has the table)
with center = NaN for a group holding a NaN or infinite reward and scale = 0 for a group of one.

Consecutive groups (group_size G): program p takes GROUPS groups as a [GROUPS, GBLOCK] tile
(GBLOCK = next power of two >= G, capped: larger groups loop over GBLOCK members at a time).
Indexed groups (group_index): no sort and no host sync. Program p takes BLOCK_I sequences and
sweeps over all B ids, BLOCK_J at a time, summing the rewards whose id matches (a second sweep
for m2): O(B^2) comparisons, cheap to B ~ 16k on a GPU; the cuda backend sorts instead.
Every sum is a tl.sum over a tile in a fixed tile order: bitwise the same on every run.
reinforce++: the first kernel writes x = r - mean to a float64 scratch (NaN for the members
left out of the batch statistics, whose advantages it writes itself); one program then
computes the batch statistics and writes the remaining advantages. So: one launch per call
(two for reinforce++), plus one elementwise launch that spreads adv over a [B, T] mask.
"""

import struct

import torch
import triton
import triton.language as tl

from rlhf_kernels.triton._common import INTERPRET, block
from rlhf_kernels.triton._op import Op

_MODES = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "reinforce++": 3}  # rlhf/group_advantages.h's AdvMode


@triton.jit
def _affine(n, mean, m2, eps, MODE: tl.constexpr):
    """The group's (center, scale): adv = (r - center) * scale; [G] float64 each."""
    finite = (mean - mean) == 0.0  # false for NaN and +-inf
    nm1 = tl.maximum(n - 1.0, 1.0)
    if MODE == 0:
        scale = 1.0 / (tl.sqrt(m2 / nm1) + eps)
    elif MODE == 2:
        scale = n / nm1
    else:
        scale = tl.zeros_like(n) + 1.0
    scale = tl.where(n < 2.0, 0.0, scale)
    center = tl.where(finite, mean, float("nan"))
    scale = tl.where(finite, scale, 1.0)
    whiten = finite & (n >= 2.0)  # enters reinforce++'s batch statistics
    return center, scale, whiten


@triton.jit
def _finish(r, center, scale, whiten, adv_ptrs, x_ptrs, valid, MODE: tl.constexpr):
    """Writes the advantages; for reinforce++ the batch members get x = r - center in x_ptrs
    (the others NaN) and their advantages later, from _whiten_kernel."""
    adv = (r - center) * scale
    if MODE == 3:
        tl.store(x_ptrs, tl.where(whiten, r - center, float("nan")), mask=valid)
        tl.store(adv_ptrs, adv.to(tl.float32), mask=valid & ~whiten)
    else:
        tl.store(adv_ptrs, adv.to(tl.float32), mask=valid)


@triton.jit
def _consecutive_kernel(
    rewards_ptr,  # [B] float32
    adv_ptr,      # [B] float32 out
    x_ptr,        # [B] float64 out (reinforce++ only): r - mean, NaN outside the batch statistics
    B, G,         # G divides B
    eps_bits,     # int64: the bits of eps as a float64
    MODE: tl.constexpr, GROUPS: tl.constexpr, GBLOCK: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    g_ok = g < B // G
    base = g[:, None] * G
    cols = tl.arange(0, GBLOCK)[None, :]
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    s = tl.zeros((GROUPS,), tl.float64)
    for c in range(0, G, GBLOCK):
        ok = g_ok[:, None] & (c + cols < G)
        s += tl.sum(tl.load(rewards_ptr + base + c + cols, mask=ok, other=0.0).to(tl.float64), 1)
    n = tl.zeros((GROUPS,), tl.float64) + G
    mean = s / n
    q = tl.zeros((GROUPS,), tl.float64)
    for c in range(0, G, GBLOCK):
        ok = g_ok[:, None] & (c + cols < G)
        d = tl.load(rewards_ptr + base + c + cols, mask=ok, other=0.0).to(tl.float64) - mean[:, None]
        q += tl.sum(tl.where(ok, d * d, 0.0), 1)
    center, scale, whiten = _affine(n, mean, q, eps, MODE)
    for c in range(0, G, GBLOCK):
        ok = g_ok[:, None] & (c + cols < G)
        offs = base + c + cols
        r = tl.load(rewards_ptr + offs, mask=ok, other=0.0).to(tl.float64)
        _finish(r, center[:, None], scale[:, None], whiten[:, None], adv_ptr + offs, x_ptr + offs, ok, MODE)


@triton.jit
def _indexed_kernel(
    rewards_ptr,  # [B] float32
    ids_ptr,      # [B] int64 group ids
    adv_ptr,      # [B] float32 out
    x_ptr,        # [B] float64 out (reinforce++ only), as in _consecutive_kernel
    B,
    eps_bits,     # int64: the bits of eps as a float64
    MODE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < B
    my_id = tl.load(ids_ptr + i, mask=i_ok, other=0)[:, None]
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    n = tl.zeros((BLOCK_I,), tl.float64)
    s = tl.zeros((BLOCK_I,), tl.float64)
    for j0 in range(0, B, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < B
        same = (tl.load(ids_ptr + j, mask=j_ok, other=0)[None, :] == my_id) & j_ok[None, :]
        r = tl.load(rewards_ptr + j, mask=j_ok, other=0.0).to(tl.float64)[None, :]
        n += tl.sum(tl.where(same, 1.0, 0.0), 1)
        s += tl.sum(tl.where(same, r, 0.0), 1)
    n = tl.maximum(n, 1.0)  # rows past B match nothing
    mean = s / n
    q = tl.zeros((BLOCK_I,), tl.float64)
    for j0 in range(0, B, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < B
        same = (tl.load(ids_ptr + j, mask=j_ok, other=0)[None, :] == my_id) & j_ok[None, :]
        d = tl.load(rewards_ptr + j, mask=j_ok, other=0.0).to(tl.float64)[None, :] - mean[:, None]
        q += tl.sum(tl.where(same, d * d, 0.0), 1)
    center, scale, whiten = _affine(n, mean, q, eps, MODE)
    r = tl.load(rewards_ptr + i, mask=i_ok, other=0.0).to(tl.float64)
    _finish(r, center, scale, whiten, adv_ptr + i, x_ptr + i, i_ok, MODE)


@triton.jit
def _whiten_kernel(
    x_ptr,    # [B] float64: r - group mean, NaN for the members outside the batch statistics
    adv_ptr,  # [B] float32 out: (x - mean(x)) / (std(x) + eps) where x is not NaN
    B, eps_bits, BLOCK: tl.constexpr,
):
    # one program: fixed-order float64 sums, deterministic, no atomics
    offs = tl.arange(0, BLOCK)
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    s = tl.zeros((BLOCK,), tl.float64)
    c = tl.zeros((BLOCK,), tl.float64)
    for i0 in range(0, B, BLOCK):
        x = tl.load(x_ptr + i0 + offs, mask=i0 + offs < B, other=float("nan"))
        s += tl.where(x == x, x, 0.0)
        c += tl.where(x == x, 1.0, 0.0)
    count = tl.sum(c, 0)
    mean = tl.sum(s, 0) / tl.maximum(count, 1.0)
    q = tl.zeros((BLOCK,), tl.float64)
    for i0 in range(0, B, BLOCK):
        x = tl.load(x_ptr + i0 + offs, mask=i0 + offs < B, other=float("nan"))
        q += tl.where(x == x, (x - mean) * (x - mean), 0.0)
    scale = 1.0 / (tl.sqrt(tl.sum(q, 0) / tl.maximum(count - 1.0, 1.0)) + eps)
    for i0 in range(0, B, BLOCK):
        x = tl.load(x_ptr + i0 + offs, mask=i0 + offs < B, other=float("nan"))
        tl.store(adv_ptr + i0 + offs, ((x - mean) * scale).to(tl.float32), mask=x == x)


@triton.jit
def _expand_kernel(
    adv_ptr,   # [B] float32
    mask_ptr,  # [B, T] int8 (0/1)
    out_ptr,   # [B, T] float32 out: adv[b] where mask, else 0
    T, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    m = tl.load(mask_ptr + b * T + t, mask=ok, other=0) != 0
    a = tl.load(adv_ptr + b)
    tl.store(out_ptr + b * T + t, tl.where(m, a, 0.0), mask=ok)


def _bits(x):
    # a float64 passed as its int64 bit pattern (a float argument would be float32)
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _group_advantages(rewards, group_index, group_size, mode, eps):
    """rewards: [B] float32 contiguous; group_index: [B] int64 contiguous, or None and
    group_size >= 1 dividing B (checked by the caller)."""
    B = rewards.shape[0]
    adv = torch.empty_like(rewards)
    if B == 0:
        return adv
    code, eps_bits = _MODES[mode], _bits(eps)
    x = torch.empty(B, dtype=torch.float64, device=rewards.device) if code == 3 else adv
    if group_index is None:
        gblock = block(group_size, 1024, 16)
        groups = max(1, (64 if INTERPRET else 2048) // gblock)
        # a tile of 2048 values with float64 statistics: 8 warps, since with 4 (16 values a thread)
        # reinforce++ at GBLOCK = 1 took 255 registers and a stack on sm_90 (benchmarks/static_sm90.py)
        _consecutive_kernel[(triton.cdiv(B // group_size, groups),)](
            rewards, adv, x, B, group_size, eps_bits, MODE=code, GROUPS=groups, GBLOCK=gblock, num_warps=8)
    else:
        bi, bj = (8, 16) if INTERPRET else (32, 128)
        _indexed_kernel[(triton.cdiv(B, bi),)](rewards, group_index, adv, x, B, eps_bits, MODE=code,
                                              BLOCK_I=bi, BLOCK_J=bj, num_warps=4)
    if code == 3:
        _whiten_kernel[(1,)](x, adv, B, eps_bits, BLOCK=block(B, 1024, 64), num_warps=4)
    return adv


def _group_advantages_masked(rewards, group_index, group_size, mode, eps, mask):
    """As _group_advantages; mask: [B, T] bool contiguous."""
    adv = _group_advantages(rewards, group_index, group_size, mode, eps)
    B, T = mask.shape
    out = torch.empty(B, T, dtype=torch.float32, device=rewards.device)
    if B > 0 and T > 0:
        bt = block(T, 1024, 64)
        _expand_kernel[(B, triton.cdiv(T, bt))](adv, mask.view(torch.int8), out, T, BLOCK_T=bt, num_warps=4)
    return adv, out


# group_size: 0 when group_index is given
group_advantages = Op("group_advantages", _group_advantages, required=("group_size",))
group_advantages_masked = Op("group_advantages_masked", _group_advantages_masked, required=("group_size",))
