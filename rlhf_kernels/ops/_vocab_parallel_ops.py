"""The vocabulary-parallel paths of token_logprobs, token_entropy, full_kl and
linear_token_logprobs (``process_group=``): the per-backend local kernels, and the autograd
Functions around them (token_entropy and full_kl share one) that run the collective and the
combine of ops/_vocab_parallel.py.

Every backend runs its single-device kernels unchanged on the local slice: the forward kernels
give each row's (m, log d), local entropy and local log-prob; the backward kernels take the saved
GLOBAL statistics, which turns them into the slice of the full gradient. The public functions in
ops/logprobs.py and ops/linear_logprobs.py check the arguments and call in here only when a
group of two or more ranks is given.

Under torch.compile these paths are a graph break (``torch.compiler.disable`` on the four entry
points at the end of this file): the code before and after the op is compiled, the op itself runs
eagerly with its one collective, and autograd connects the pieces. Tracing it would need the
collective as a functional collective inside a traced autograd.Function; not done.
"""

import torch

from rlhf_kernels import _ext
from rlhf_kernels.ops import _vocab_parallel as vp

NATIVE = ("cpu", "cuda")
_NO_LABEL = -1  # the local kernels' ignore_index: local labels are always >= 0, so no row is skipped


def _ops():
    return torch.ops.rlhf_kernels if _ext.loaded() else None


def _tri():
    from rlhf_kernels.triton import logprobs as tri
    return tri


# ---- local kernels of the logits ops: z [N, V_local] contiguous ----

def _torch_stats(s):
    """float32 scaled logits [N, V] -> (m, log d, entropy) float32 [N], as rlhf/logprobs.h."""
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m)
    d = e.sum(-1)
    w = torch.where(e > 0, e * (s - m), 0.0).sum(-1)
    log_d = torch.log(d)
    return m[:, 0], log_d, log_d - w / d


def local_logprobs_fwd(name, z, y, temperature):
    """-> (logp of the local label y [N] or None, local entropy [N], stats (m, log d) [N, 2])."""
    if name in NATIVE:
        if y is None:
            h, stats = _ops().token_entropy_fwd.default(z, temperature)
            return None, h, stats
        return _ops().token_logprobs_fwd.default(z, y, temperature, _NO_LABEL, False, False)
    if name == "triton":
        lp, h, stats = _tri()._forward(z, y, temperature, _NO_LABEL)
        return (lp if y is not None else None), h, stats
    s = z.float() * (1.0 / temperature)
    m, log_d, h = _torch_stats(s)
    lp = None if y is None else (s.gather(1, y.view(-1, 1))[:, 0] - m) - log_d
    return lp, h, torch.stack((m, log_d), 1)


def local_logprobs_bwd(name, z, g_logp, g_entropy, stats, entropy, temperature, inplace):
    """dz of g_l * logp + g_H * H with p from ``stats``, WITHOUT the label's one-hot term."""
    if name in NATIVE:
        if inplace:
            _ops().logprobs_bwd_inplace.default(z, None, g_logp, g_entropy, stats, entropy, temperature, _NO_LABEL)
            return z
        return _ops().logprobs_bwd.default(z, None, g_logp, g_entropy, stats, entropy, temperature, _NO_LABEL)
    if name == "triton":
        tri = _tri()
        out = z if inplace else torch.empty_like(z)
        return tri._backward_into(out, z, None, g_logp, g_entropy, stats, entropy, temperature, _NO_LABEL)
    inv_t = 1.0 / temperature
    lp = (z.float() * inv_t - stats[:, :1]) - stats[:, 1:]
    p = torch.exp(lp)
    g = torch.zeros_like(p[:, :1]) if g_logp is None else g_logp.view(-1, 1)
    if g_entropy is not None:
        g = g + g_entropy.view(-1, 1) * (lp + entropy.view(-1, 1))
    return (torch.where(p != 0, -p * g, 0.0) * inv_t).to(z.dtype)


def local_kl_fwd(name, z, zr, temperature):
    """-> (KL of the local softmaxes [N], stats (m, log d, m_ref, log d_ref) [N, 4])."""
    if name in NATIVE:
        return _ops().full_kl_fwd.default(z, zr, temperature)
    if name == "triton":
        return _tri()._full_kl_forward(z, zr, temperature)
    inv_t = 1.0 / temperature
    s, r = z.float() * inv_t, zr.float() * inv_t
    m, log_d, _ = _torch_stats(s)
    mr, log_dr, _ = _torch_stats(r)
    e = torch.exp(s - m.view(-1, 1))
    w = torch.where(e > 0, e * (s - r), 0.0).sum(-1)
    kl = w / torch.exp(log_d) + (mr - m) + (log_dr - log_d)
    return kl, torch.stack((m, log_d, mr, log_dr), 1)


def local_kl_bwd(name, g, z, zr, kl, stats, temperature):
    if name in NATIVE:
        return _ops().full_kl_bwd.default(g, z, zr, kl, stats, temperature)
    if name == "triton":
        return _tri()._full_kl_backward(g, z, zr, kl, stats, temperature)
    inv_t = 1.0 / temperature
    lp = (z.float() * inv_t - stats[:, 0:1]) - stats[:, 1:2]
    lq = (zr.float() * inv_t - stats[:, 2:3]) - stats[:, 3:4]
    p = torch.exp(lp)
    d = torch.where(p != 0, g.view(-1, 1) * p * (lp - lq - kl.view(-1, 1)), 0.0)
    return (d * inv_t).to(z.dtype)


# ---- the logits ops ----

class TokenLogprobs(torch.autograd.Function):
    """(logits [..., V_local], labels [...]) -> global (logp [...], entropy [...]) float32."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, inplace_backward, name, shard):
        z = logits.contiguous().view(-1, logits.shape[-1])
        lab = vp.localize_labels(labels, shard, ignore_index)
        lp_r, h_r, st_r = local_logprobs_fwd(name, z, lab.local, temperature)
        g = vp.gather_rows(torch.stack((st_r[:, 0], st_r[:, 1], h_r, lp_r), 1), shard)
        stats, h, log_pi = vp.combine_softmax(g[..., 0], g[..., 1], g[..., 2])
        logp = vp.owner_logprob(g[..., 3], log_pi, lab)
        ctx.save_for_backward(z, lab.local, lab.mine, lab.valid, stats, torch.where(lab.valid, h, 0.0))
        ctx.args = (temperature, bool(inplace_backward) and name != "torch", name, logits.shape)
        ctx.set_materialize_grads(False)
        lead = logits.shape[:-1]
        return logp.view(lead), vp.mask_rows(h, lab).view(lead)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        if g_logp is None and g_entropy is None:
            return (None,) * 7
        z, local, mine, valid, stats, h = ctx.saved_tensors
        temperature, inplace, name, shape = ctx.args
        lab = _Lab(local, mine, valid)
        gl, gh = vp.upstream(g_logp, lab), vp.upstream(g_entropy, lab)
        grad = local_logprobs_bwd(name, z, gl, gh, stats, h, temperature, inplace)
        vp.add_label_onehot(grad, lab, gl, 1.0 / temperature)
        return grad.view(shape), None, None, None, None, None, None


class _Lab:
    """The parts of LocalLabels the backward keeps."""

    def __init__(self, local, mine, valid):
        self.local, self.mine, self.valid = local, mine, valid


class EntropyOrKl(torch.autograd.Function):
    """logits [..., V_local] -> global entropy [...] float32; with ref_logits [..., V_local] as
    well, global KL(pi || pi_ref) [...] instead. Both go the same way: each rank's local
    statistics and value per row, one all-gather, the combine; the backward is the local
    backward kernel run on the global statistics."""

    @staticmethod
    def forward(ctx, logits, ref_logits, temperature, name, shard):
        z = logits.contiguous().view(-1, logits.shape[-1])
        zr = None if ref_logits is None else ref_logits.contiguous().view(-1, logits.shape[-1])
        if zr is None:
            _, value_r, st_r = local_logprobs_fwd(name, z, None, temperature)
        else:
            value_r, st_r = local_kl_fwd(name, z, zr, temperature)
        g = vp.gather_rows(torch.cat((st_r, value_r.view(-1, 1)), 1), shard).unbind(-1)
        stats, value = vp.combine_softmax(*g)[:2] if zr is None else vp.combine_kl(*g)
        ctx.save_for_backward(z, zr, value, stats)
        ctx.args = (temperature, name, logits.shape)
        ctx.set_materialize_grads(False)
        return value.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, g_value):
        if g_value is None:
            return None, None, None, None, None
        z, zr, value, stats = ctx.saved_tensors
        temperature, name, shape = ctx.args
        g = g_value.reshape(-1).float().contiguous()
        if zr is None:
            grad = local_logprobs_bwd(name, z, None, g, stats, value, temperature, False)
        else:
            grad = local_kl_bwd(name, g, z, zr, value, stats, temperature)
        return grad.view(shape), None, None, None, None


# ---- linear_token_logprobs: h [N, H], w [V_local, H], b [V_local] or None, contiguous ----

_TORCH_ROWS_ELEMS = 1 << 22  # logits elements per token chunk of the torch backend


def _torch_chunks(h, w):
    step = max(1, _TORCH_ROWS_ELEMS // max(1, w.shape[0]))
    return range(0, h.shape[0], step), step


def _torch_logits(h, w, b):
    s = h.float() @ w.float().t()
    return s if b is None else s + b.float()


def local_linear_fwd(name, h, w, b, y, temperature, tile):
    if name in NATIVE:
        return _ops().linear_logprobs_fwd.default(h, w, b, y, temperature, _NO_LABEL, tile, False)
    if name == "triton":
        from rlhf_kernels.triton import linear_logprobs as tl_
        return tl_._forward(h, w, b, y, temperature, _NO_LABEL, tile)
    outs = []
    starts, step = _torch_chunks(h, w)
    for r0 in starts:
        outs.append(local_logprobs_fwd("torch", _torch_logits(h[r0:r0 + step], w, b), y[r0:r0 + step], temperature))
    return tuple(torch.cat(parts) for parts in zip(*outs))


def local_linear_bwd(name, h, w, b, lab, gl, gh, stats, entropy, temperature, tile, need):
    """-> (d_hidden, d_weight, d_bias) of this slice, the one-hot term only on the owner's rows.
    The native and Triton kernels get the head with a sink row (vp.sink_head): one copy of the
    local weight [V_local + 1, H] per backward, and d_weight made [V_local + 1, H] then sliced."""
    need_h, need_w, need_b = need
    if name in NATIVE or name == "triton":
        w_s, b_s = vp.sink_head(w, b)
        args = (h, w_s, b_s, lab.sink, gl, gh, stats, entropy, temperature, _NO_LABEL, tile, need_h, need_w, need_b)
        if name in NATIVE:
            dh, dw, db = _ops().linear_logprobs_bwd.default(*args)
        else:
            from rlhf_kernels.triton import linear_logprobs as tl_
            dh, dw, db = tl_._backward(*args)
        V = w.shape[0]
        return dh, (dw[:V] if need_w else None), (db[:V] if need_b else None)
    inv_t = 1.0 / temperature
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if need_w else None
    db = torch.zeros(w.shape[0], dtype=torch.float32, device=h.device) if need_b else None
    starts, step = _torch_chunks(h, w)
    for r0 in starts:
        sl = slice(r0, r0 + step)
        part = _Lab(lab.local[sl], lab.mine[sl], lab.valid[sl])
        g_l = None if gl is None else gl[sl]
        ds = local_logprobs_bwd("torch", _torch_logits(h[sl], w, b), g_l, None if gh is None else gh[sl],
                                stats[sl], entropy[sl], temperature, False)
        ds = vp.add_label_onehot(ds, part, g_l, inv_t)
        if need_h:
            dh[sl] = ds @ w.float()
        if need_w:
            dw += ds.t() @ h[sl].float()
        if need_b:
            db += ds.sum(0)
    cast = lambda t: None if t is None else t.to(h.dtype)  # noqa: E731
    return cast(dh), cast(dw), cast(db)


class LinearTokenLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V_local, H], bias [V_local] or None, labels [N]) -> global
    (logp [N], entropy [N]) float32; d_hidden is this rank's partial sum."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, tile, name, shard):
        lab = vp.localize_labels(labels, shard, ignore_index)
        lp_r, h_r, st_r = local_linear_fwd(name, hidden, weight, bias, lab.local, temperature, tile)
        g = vp.gather_rows(torch.stack((st_r[:, 0], st_r[:, 1], h_r, lp_r), 1), shard)
        stats, h, log_pi = vp.combine_softmax(g[..., 0], g[..., 1], g[..., 2])
        logp = vp.owner_logprob(g[..., 3], log_pi, lab)
        ctx.save_for_backward(hidden, weight, bias, lab.local, lab.sink, lab.mine, lab.valid, stats,
                              torch.where(lab.valid, h, 0.0))
        ctx.args = (temperature, tile, name)
        ctx.set_materialize_grads(False)
        return logp, vp.mask_rows(h, lab)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, local, sink, mine, valid, stats, h = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if (g_logp is None and g_entropy is None) or not any(need):
            return (None,) * 9
        temperature, tile, name = ctx.args
        lab = _Lab(local, mine, valid)
        lab.sink = sink
        gl, gh = vp.upstream(g_logp, lab), vp.upstream(g_entropy, lab)
        dh, dw, db = local_linear_bwd(name, hidden, weight, bias, lab, gl, gh, stats, h, temperature, tile, need)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + (None,) * 6


# ---- the entry points: a graph break under torch.compile (see the module docstring) ----
# torch.compiler.disable imports torch._dynamo, and with it triton, when it decorates; torch's lazy
# form of it does that at the first call instead, so `import rlhf_kernels` stays free of both.
_graph_break = getattr(torch, "_disable_dynamo", torch.compiler.disable)


@_graph_break
def token_logprobs(logits, labels, temperature, ignore_index, inplace_backward, name, shard):
    return TokenLogprobs.apply(logits, labels, temperature, ignore_index, inplace_backward, name, shard)


@_graph_break
def token_entropy(logits, temperature, name, shard):
    return EntropyOrKl.apply(logits, None, temperature, name, shard)


@_graph_break
def full_kl(logits, ref_logits, temperature, name, shard):
    return EntropyOrKl.apply(logits, ref_logits, temperature, name, shard)


@_graph_break
def linear_token_logprobs(hidden, weight, bias, labels, temperature, ignore_index, tile, name, shard):
    return LinearTokenLogprobs.apply(hidden, weight, bias, labels, temperature, ignore_index, tile, name, shard)
