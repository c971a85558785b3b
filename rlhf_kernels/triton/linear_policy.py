"""The policy head, hidden states straight to the policy objective: torch matmuls, one Triton
epilogue per chunk, the gradients made in the forward.

The same algorithm as the native ops (csrc/include/rlhf/linear_policy_op.h, whose comment has
the whole story): each row's weight w_b in the aggregated loss comes from the mask (and
num_tokens) first; then the tokens are walked in chunks of ``rows`` whose float32 logits
[rows, V] (all of V) come from one matmul (cuBLAS through torch, float32 output from 16-bit
inputs), and one program per row of the chunk (_policy_head_kernel):
    1. folds the row into its online-softmax statistics (m, d, w) of s = logits / T, bias added:
       logp = (s_y - m) - log d, H = log d - w / d;
       then the token's terms (rlhf/linear_policy.h): kl = k1 | k2 | k3 | abs of x = logp - ref,
       g_logp = s_b _policy_grad_token (triton/ppo.py: ppo_policy_loss's backward, under its
       options) + w_b kl_coef d kl / dx,  g_H = -entropy_coef w_b;
    2. (with gradients) reads the row again and writes
       dlogits = [g_logp (onehot(y) - p) - g_H p (log p + H)] / T
       in the operands' dtype (in place for float32).
Then torch matmuls give d_hidden of the chunk's rows (one product) and d_weight (+)= dlogits^T @
hidden[rows]; d_bias sums columns. 6NHV FLOPs in all; the backward multiplies the stored
gradients by the upstream one. Masked rows give 0 and a zero gradient row (labels never read);
a label outside [0, V) at a valid row gives NaN logp and entropy and a zero gradient row.
The PPO loss and statistics are triton/ppo.py's policy_forward on the [B, T] logp; the entropy
and KL terms are aggregated with the same w_b. s_b is that op's row_scale (see _linear_policy;
the sequence-level ratio takes two passes).
(k3 is exp(-x) - 1 + x here: Triton has no expm1; its cancellation costs ~1e-7 absolute.)
Batch invariance, as in the native ops: ``rows`` never depends on N nor on which gradients are
asked for, and every matmul sees a whole [rows, H] block (the last one padded: triton/
linear_logprobs.py's _row_block), so a token's logp, entropy and KL are bitwise the same whatever
other tokens share its batch; the cost is up to rows - 1 padded rows per call.
"""

import torch
import triton
import triton.language as tl

from rlhf_kernels._layout import KL_KINDS, LOSS_AGG_CODES
from rlhf_kernels.triton import _common
from rlhf_kernels.triton import ppo as tri_ppo
from rlhf_kernels.triton._op import DifferentiableOp
from rlhf_kernels.triton.ppo import _policy_flags, _policy_grad_token
from rlhf_kernels.triton.linear_logprobs import _mm_f32, _operand, _row_block
from rlhf_kernels.triton.logprobs import fold, logprob_grad

# Bytes of the float32 logits of a chunk, their 16-bit gradient and the float32 d_weight
# accumulator together (the native CUDA op's budget); the accumulator only up to ACC_BYTES.
BUFFER_BYTES = (1 << 30) - (64 << 20)
ACC_BYTES = 512 << 20
MAX_ROWS = 2048  # the most token rows per chunk (the native CUDA op's kMaxRows)
_KL_CODES = {name: code for code, name in enumerate(KL_KINDS)}


@triton.jit
def _policy_head_kernel(
    z_ptr,        # [nr, V] float32 logits (no bias), rows contiguous
    dz_ptr,       # [nr, V] out: dlogits in the matmul operands' dtype (may be z_ptr: each block
                  # of a row is read before it is written); written only when GRAD
    bias_ptr,     # [V] float32 bias; read only when HAS_BIAS
    labels_ptr,   # [nr] int32/int64 labels; read only where the mask is set
    mask_ptr,     # [nr] int8 (the bool mask viewed as bytes)
    old_ptr,      # [nr] float32 old log-probabilities
    adv_ptr,      # [nr] float32 advantages
    ref_ptr,      # [nr] float32 reference log-probabilities; read only when HAS_REF
    roll_ptr,     # [nr] float32 rollout log-probabilities; read only when TOKEN_IS
    w_ptr,        # [nr] float32 w_b, the weight of the token's row in the loss
    s_ptr,        # [nr] float32 s_b, the policy term's row factor (ppo_policy_loss's row_scale)
    logp_ptr,     # [nr] float32 out: logp (0 where masked)
    ent_ptr,      # [nr] float32 out: entropy (0 where masked)
    kl_ptr,       # [nr] float32 out: the KL estimate (0 where masked); written only when HAS_REF
    V, inv_t, clip_low, clip_high, dual_clip, is_cap, kl_coef, entropy_coef,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr, KL_KIND: tl.constexpr,
    SEQ_RATIO: tl.constexpr, SEQ_GRAD: tl.constexpr, CISPO: tl.constexpr, IS_MODE: tl.constexpr,
    TOKEN_IS: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * V
    out = dz_ptr + row * V
    cols = tl.arange(0, BLOCK)
    if tl.load(mask_ptr + row) != 0:
        m = tl.full((), float("-inf"), tl.float32)
        d = tl.zeros((), tl.float32)
        w = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            z = tl.load(base + idx, mask=idx < V, other=float("-inf"))
            if HAS_BIAS:
                z += tl.load(bias_ptr + idx, mask=idx < V, other=0.0)
            m, d, w = fold(m, d, w, z * inv_t)
        y = tl.load(labels_ptr + row).to(tl.int64)
        in_vocab = (y >= 0) & (y < V)
        z_y = tl.load(base + y, mask=in_vocab, other=0.0)
        if HAS_BIAS:
            z_y += tl.load(bias_ptr + y, mask=in_vocab, other=0.0)
        log_d = tl.log(d)
        lp = tl.where(in_vocab, (z_y * inv_t - m) - log_d, float("nan"))
        h = tl.where(in_vocab, log_d - w / d, float("nan"))
        old = tl.load(old_ptr + row)
        rollout = old
        if TOKEN_IS:
            rollout = tl.load(roll_ptr + row)
        d_ppo = _policy_grad_token(lp, old, tl.load(adv_ptr + row), rollout, clip_low, clip_high, dual_clip, is_cap,
                                   HAS_DUAL, SEQ_RATIO, SEQ_GRAD, CISPO, IS_MODE, TOKEN_IS)
        wb = tl.load(w_ptr + row)
        g_l = tl.load(s_ptr + row) * d_ppo
        if HAS_REF:
            x = lp - tl.load(ref_ptr + row)
            if KL_KIND == 0:
                kl = x
                d_kl = x * 0.0 + 1.0
            elif KL_KIND == 1:
                kl = 0.5 * x * x
                d_kl = x
            elif KL_KIND == 2:
                e_m1 = tl.exp(-x) - 1.0
                kl = e_m1 + x
                d_kl = -e_m1
            else:
                kl = tl.abs(x)
                d_kl = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
            tl.store(kl_ptr + row, kl)
            g_l += wb * kl_coef * d_kl
        g_h = -entropy_coef * wb
        tl.store(logp_ptr + row, lp)
        tl.store(ent_ptr + row, h)
        if GRAD:
            for start in range(0, V, BLOCK):
                idx = start + cols
                inb = idx < V
                z = tl.load(base + idx, mask=inb, other=0.0)
                if HAS_BIAS:
                    z += tl.load(bias_ptr + idx, mask=inb, other=0.0)
                ds = logprob_grad(z * inv_t, idx, y, m, log_d, h, g_l, g_h, inv_t, in_vocab)
                tl.store(out + idx, ds.to(dz_ptr.dtype.element_ty), mask=inb)
    else:
        tl.store(logp_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        if HAS_REF:
            tl.store(kl_ptr + row, 0.0)
        if GRAD:
            for start in range(0, V, BLOCK):
                idx = start + cols
                tl.store(out + idx, tl.zeros((BLOCK,), tl.float32).to(dz_ptr.dtype.element_ty), mask=idx < V)


def _block(n):
    # the interpreter runs a program's loops in numpy: small blocks exercise the merge
    return _common.block(n, 4096, 128)


def row_weights(mask, agg, num_tokens):
    """w_b, each row's weight in the aggregated loss (ppo_row_weight in rlhf/ppo.h): float64 [B],
    0 for rows without a valid token. mask [B, T] bool; num_tokens a 0-d float64 tensor or None."""
    count = mask.sum(1, dtype=torch.float64)
    has = count > 0
    if agg == LOSS_AGG_CODES["token-mean"]:
        denom = count.sum()
        if num_tokens is not None:
            denom = torch.where(num_tokens > 0, num_tokens, denom)
        w = (1.0 / denom).expand_as(count)
    elif agg == LOSS_AGG_CODES["seq-mean-token-mean"]:
        w = 1.0 / (count * has.sum(dtype=torch.float64))
    elif agg == LOSS_AGG_CODES["seq-mean-token-sum"]:
        w = (1.0 / has.sum(dtype=torch.float64)).expand_as(count)
    elif agg == LOSS_AGG_CODES["seq-mean-token-sum-norm"]:
        w = torch.full_like(count, 1.0 / max(mask.numel(), 1))
    else:  # token-sum
        w = torch.ones_like(count)
    return torch.where(has, w, 0.0)


def _chunk_rows(N, V, H, dt, op_dtype, tile, need_w):
    """(rows per chunk, float32 d_weight accumulator or not), as the native ops choose them
    (chunk_rows): rows from (V, H, the dtypes, tile) alone, never from N nor from which
    gradients are asked for (batch invariance), a power of two <= MAX_ROWS."""
    in_place = op_dtype == torch.float32
    row_bytes = V * (4 + (0 if in_place else torch.empty((), dtype=op_dtype).element_size()))
    acc_optional = op_dtype == dt and dt != torch.float32 and V * H * 4 <= ACC_BYTES
    budget = BUFFER_BYTES - (V * H * 4 if acc_optional else 0)
    want = min(max(tile // V if tile > 0 else budget // row_bytes, 1), MAX_ROWS)
    rows = 1
    while rows * 2 <= want:
        rows *= 2
    chunks = -(-N // rows)
    acc = need_w and (op_dtype != dt or (acc_optional and chunks > 1))
    return rows, acc


def _per_token(rows, mask):
    return torch.where(mask, rows[:, None], 0.0).float().contiguous()


def _linear_policy(hidden, weight, bias, y, old, adv, mask, ref, num_tokens, temperature, kl_coef, kl_kind,
                   entropy_coef, clip_low, clip_high, dual_clip, agg, rollout, options, is_cap, tile, need_h, need_w,
                   need_b):
    """hidden [N, H], weight [V, H], bias [V] or None (one dtype, contiguous), y [N] int32/int64,
    old, adv, ref (or None), rollout (or None) [B, T] float32, mask [B, T] bool (B * T = N),
    num_tokens a 0-d float64 tensor or None, options/is_cap as ppo_policy_fwd's. Returns (loss [],
    stats [len(LINEAR_POLICY_STATS)], logp [B, T], d_hidden [N, H], d_weight [V, H], d_bias [V]) (a
    gradient not asked for: [0]), float32 but the gradients.

    The policy term's row factor s_b is triton/ppo.py's row_scale: from one policy_forward on the
    [B, T] inputs before the chunks, or, for the sequence ratio (whose s_b needs every logp of the
    row), after a first pass without gradients (two passes: 8NHV; see linear_policy_op.h)."""
    N, H = hidden.shape
    V = weight.shape[0]
    B, T = mask.shape
    dt = hidden.dtype
    f32 = dict(dtype=torch.float32, device=hidden.device)
    need_grad = need_h or need_w or need_b
    none = lambda: hidden.new_empty((0,))  # noqa: E731  (outputs must not alias one another)
    d_hidden = torch.empty_like(hidden) if need_h else none()
    d_weight = torch.empty_like(weight) if need_w else none()
    d_bias = torch.zeros(V, **f32) if need_b else None
    logp, entropy = torch.empty(B, T, **f32), torch.empty(B, T, **f32)
    kl = torch.empty(B, T, **f32) if ref is not None else None
    w_row = row_weights(mask, agg, num_tokens)
    w_tok = _per_token(w_row, mask)
    flags = _policy_flags(options)
    ppo_args = (old, adv, mask, num_tokens, clip_low, clip_high, dual_clip, agg, rollout, options, is_cap)
    two_pass = need_grad and flags["SEQ_RATIO"] and N > 0
    s_tok = w_tok
    if need_grad and not two_pass:  # s_b does not depend on logp: the [B, T] inputs give it
        s_tok = _per_token(tri_ppo.policy_forward(old, *ppo_args)[2], mask)
    if N > 0:
        h, w = _operand(hidden), _operand(weight)
        b = None if bias is None else bias.float().contiguous()
        block = _block(V)
        m8 = mask.reshape(-1).view(torch.int8)
        flat = lambda t: t.reshape(-1)  # noqa: E731

        def run_chunks(grad):
            rows, acc = _chunk_rows(N, V, H, dt, h.dtype, tile, grad and need_w)
            dw_acc = torch.empty(V, H, **f32) if acc else None
            pad = None
            for r0 in range(0, N, rows):
                n = min(rows, N - r0)
                sl = slice(r0, r0 + n)
                hr = h[sl]
                h_block, pad = _row_block(h, pad, r0, n, rows)
                logits_block = _mm_f32(h_block, w.t())  # [rows, V]: the first n rows are the chunk's
                dz_block = logits_block if h.dtype == torch.float32 else torch.empty(
                    logits_block.shape, dtype=h.dtype, device=h.device)
                logits, dz = logits_block[:n], dz_block[:n]
                _policy_head_kernel[(n,)](
                    logits, dz, b if b is not None else logits, y[sl], m8[sl], flat(old)[sl], flat(adv)[sl],
                    flat(ref)[sl] if ref is not None else logits, flat(rollout)[sl] if rollout is not None else logits,
                    flat(w_tok)[sl], flat(s_tok)[sl], flat(logp)[sl], flat(entropy)[sl],
                    flat(kl)[sl] if kl is not None else logits, V, 1.0 / temperature, clip_low, clip_high,
                    dual_clip or 0.0, is_cap, kl_coef, entropy_coef, HAS_BIAS=b is not None, HAS_REF=ref is not None,
                    HAS_DUAL=dual_clip is not None, KL_KIND=_KL_CODES[kl_kind], SEQ_RATIO=flags["SEQ_RATIO"],
                    SEQ_GRAD=flags["SEQ_GRAD"], CISPO=flags["CISPO"], IS_MODE=flags["IS_MODE"],
                    TOKEN_IS=flags["TOKEN_IS"], GRAD=grad, BLOCK=block, num_warps=_common.warps(block))
                if not grad:
                    continue
                if need_h:  # one [rows, V] x [V, H] product whatever n is
                    d_hidden[sl] = torch.mm(dz_block, w)[:n]
                if need_w:
                    if acc:
                        if r0 == 0:
                            dw_acc.copy_(_mm_f32(dz.t(), hr))
                        else:
                            dw_acc += _mm_f32(dz.t(), hr)
                    elif r0 == 0:
                        torch.mm(dz.t(), hr, out=d_weight)
                    else:
                        d_weight.addmm_(dz.t(), hr)
                if need_b:
                    d_bias.add_(dz.sum(0, dtype=torch.float32))
                del logits, dz, logits_block, dz_block
            if acc:
                d_weight.copy_(dw_acc)

        if two_pass:  # the sequence ratio: every row's logp, then s_b, then the gradients
            run_chunks(False)
            s_tok = _per_token(tri_ppo.policy_forward(logp, *ppo_args)[2], mask)
        run_chunks(need_grad)
    elif need_w:
        d_weight.zero_()
    loss, stats, _ = tri_ppo.policy_forward(logp, *ppo_args)
    count = mask.sum(dtype=torch.float64).clamp(min=1)
    ent_rows = entropy.sum(1, dtype=torch.float64)
    loss = loss.double()
    if entropy_coef != 0:
        loss = loss - entropy_coef * (ent_rows * w_row).sum()
    kl_mean = torch.zeros((), dtype=torch.float64, device=hidden.device)
    if kl is not None:
        kl_rows = kl.sum(1, dtype=torch.float64)
        loss = loss + kl_coef * (kl_rows * w_row).sum()
        kl_mean = kl_rows.sum() / count
    stats = torch.cat((stats, torch.stack((ent_rows.sum() / count, kl_mean)).float()))
    return (loss.float(), stats, logp, d_hidden, d_weight,
            d_bias.to(dt) if need_b else none())


# ---- the op (rlhf_kernels/triton/_op.py). Inputs as rlhf_kernels/ops/linear_policy.py passes them
# (checked there). The forward makes the gradients; saved for the backward: those gradients alone.

def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[3:])
    ctx.need = inputs[-3:]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _grad(ctx, g_loss, *_):
    grads = [None] * 24
    if g_loss is None:
        return tuple(grads)
    compiling = torch.compiler.is_compiling()
    for i, (g, need) in enumerate(zip(ctx.saved_tensors, ctx.need)):
        if need:  # eager: in place (nothing else holds them); traced: functional
            grads[i] = g * g_loss if compiling else g.mul_(g_loss)
    return tuple(grads)


# (hidden, weight, bias, y, old, adv, mask, ref, num_tokens, temperature, kl_coef, kl_kind, entropy_coef,
# clip_low, clip_high, dual_clip, loss_agg, rollout, options, is_cap, tile, need_hidden, need_weight,
# need_bias) -> (loss, stats, logp, d_hidden, d_weight, d_bias); the loss differentiable wrt hidden,
# weight and bias (those that `need_*` name: the caller sets them from requires_grad and grad mode).
linear_policy = DifferentiableOp("linear_policy_fwd_grad", _linear_policy, _setup, _grad,
                                 drop=("num_tokens_value", "validate"), required=("clip_high", "is_cap"))
