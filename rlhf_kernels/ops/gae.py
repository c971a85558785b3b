"""Generalized advantage estimation and masked whitening (no gradients).

Math, per sequence, walking back in time over unmasked steps:
    delta_t = r_t + gamma * V_next - V_t
    A_t     = delta_t + gamma * lam * A_next
    R_t     = A_t + V_t
where V_next and A_next belong to the next *unmasked* step (``last_values`` and 0 after
the last one). A masked step is skipped, not a reset: it adds no TD error and does not
break the chain; A and R are 0 there. For right-padded responses this equals the loop in
TRL and OpenRLHF.
"""

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._signatures import f32, shape
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import gae as ref

NATIVE = _backend.NATIVE
if _ext.loaded():
    _gae = torch.ops.rlhf_kernels.gae.default
    _gae_packed = torch.ops.rlhf_kernels.gae_packed.default
    _masked_whiten = torch.ops.rlhf_kernels.masked_whiten.default


def _check_discount(op, gamma, lam):
    return v.number(op, "gamma", gamma, lo=0.0, hi=1.0), v.number(op, "lam", lam, lo=0.0, hi=1.0)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, last_values=None, backend="auto"):
    """Advantages and returns for a padded batch.

    Args:
        rewards: [B, T] float (any float dtype).
        values: [B, T] float, V_t from the critic.
        mask: [B, T] bool or integer (nonzero = the step counts). Float masks are refused.
        gamma, lam: discount and GAE lambda, each in [0, 1].
        last_values: [B] float, the value after each row's last step (default 0).
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (advantages [B, T], returns [B, T]), float32; 0 at masked steps.
    """
    op = "gae"
    name = _backend.pick(backend, rewards, op, "rewards")
    if name in NATIVE:
        try:
            return _gae(rewards, values, mask, last_values, gamma, lam)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
    v.floats(op, ("rewards", "values"), (rewards, values), 2, mask, device=False)  # device: with last_values, below
    gamma, lam = _check_discount(op, gamma, lam)
    if last_values is not None:
        v.tensor(op, "last_values", last_values, kind="float")
        if last_values.dim() != 1 or last_values.shape[0] != rewards.shape[0]:
            raise ValueError("gae: `last_values` must have shape [B] = [%d], got %s"
                             % (rewards.shape[0], list(last_values.shape)))
    v.same_device(op, "rewards", rewards, values=values, mask=mask, last_values=last_values)
    r, val, m = v.as_f32(rewards), v.as_f32(values), v.as_mask(mask)
    lv = None if last_values is None else v.as_f32(last_values)
    if name == "torch":
        a, R = ref.gae(r.double(), val.double(), m, gamma, lam, None if lv is None else lv.double())
        return a.float(), R.float()
    from rlhf_kernels.triton import gae as tri
    return tri.gae(r, val, m, lv, gamma, lam)


def _check_cu_seqlens(cu_seqlens, N):
    """Reads cu_seqlens on the host: a device sync when they live on a GPU."""
    host = cu_seqlens.to("cpu", torch.int64)
    if host[0].item() != 0 or host[-1].item() != N:
        raise ValueError("gae_packed: `cu_seqlens` must start at 0 and end at N=%d (len(rewards)), got %d ... %d"
                         % (N, host[0].item(), host[-1].item()))
    steps = host[1:] - host[:-1]
    if (steps < 0).any():
        b = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError("gae_packed: `cu_seqlens` must be non-decreasing, but cu_seqlens[%d]=%d > "
                         "cu_seqlens[%d]=%d" % (b, host[b].item(), b + 1, host[b + 1].item()))


def gae_packed(rewards, values, cu_seqlens, *, gamma=1.0, lam=0.95, last_values=None, mask=None,
               validate=True, backend="auto"):
    """Advantages and returns for sequences packed end to end (no padding).

    Args:
        rewards, values: [N] float.
        cu_seqlens: [B+1] integer offsets, 0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = N;
            sequence b is rewards[cu_seqlens[b]:cu_seqlens[b+1]].
        last_values: [B] float, the value after each sequence's last step (default 0).
        mask: [N] bool or integer, optional; masked steps are skipped as in ``gae``.
        validate: check the values of ``cu_seqlens``. For CUDA tensors that reads them on
            the host, one device sync per call; ``validate=False`` skips it (then wrong
            offsets give unspecified values, never an out-of-bounds access). It is also
            skipped while torch.compile traces or a CUDA graph is being captured. CPU
            tensors are always checked (no sync to save).

    Returns:
        (advantages [N], returns [N]), float32.
    """
    op = "gae_packed"
    name = _backend.pick(backend, rewards, op, "rewards")
    if name == "cpu":
        try:
            return _gae_packed(rewards, values, cu_seqlens, last_values, mask, gamma, lam)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
    v.floats(op, ("rewards", "values"), (rewards, values), 1, device=False)  # device: with cu_seqlens, below
    v.tensor(op, "cu_seqlens", cu_seqlens, ndim=1, kind="int")
    if cu_seqlens.numel() < 1:
        raise ValueError("gae_packed: `cu_seqlens` must have B+1 >= 1 entries, got shape %s"
                         % (list(cu_seqlens.shape),))
    if mask is not None:
        v.tensor(op, "mask", mask, kind="mask")
        v.same_shape(op, "rewards", rewards, "mask", mask)
    gamma, lam = _check_discount(op, gamma, lam)
    B = cu_seqlens.numel() - 1
    if last_values is not None:
        v.tensor(op, "last_values", last_values, kind="float")
        if last_values.dim() != 1 or last_values.shape[0] != B:
            raise ValueError("gae_packed: `last_values` must have shape [B] = [%d] (len(cu_seqlens)-1), got %s"
                             % (B, list(last_values.shape)))
    v.same_device(op, "rewards", rewards, values=values, cu_seqlens=cu_seqlens, mask=mask,
                  last_values=last_values)
    if validate and not (torch.compiler.is_compiling() or
                         (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing())):
        _check_cu_seqlens(cu_seqlens, rewards.shape[0])
    if name == "cuda":
        return _gae_packed(rewards, values, cu_seqlens, last_values, mask, gamma, lam)
    r, val = v.as_f32(rewards), v.as_f32(values)
    cu = cu_seqlens.to(torch.int64).contiguous()
    m = None if mask is None else v.as_mask(mask)
    lv = None if last_values is None else v.as_f32(last_values)
    if name == "torch":
        a, R = ref.gae_packed(r.double(), val.double(), cu, gamma, lam, None if lv is None else lv.double(), m)
        return a.float(), R.float()
    from rlhf_kernels.triton import gae as tri
    return tri.gae_packed(r, val, cu, lv, m, gamma, lam)


def masked_whiten(x, mask, *, shift_mean=True, unbiased=True, eps=1e-8, backend="auto", process_group=None):
    """Whiten ``x`` with the mean and variance of its masked-in entries.

    ``out = (x - mean) / sqrt(var + eps)`` (``+ mean`` when ``shift_mean=False``) where
    ``mask`` is true, 0 elsewhere. Statistics are float64 over all masked-in entries;
    ``unbiased`` uses n - 1 (the variance is 0 when n < 2).

    With ``process_group`` (data parallel: each rank holds its own rows), the mean and
    variance are those of the masked-in entries of every rank's ``x`` together, the same on
    every backend: each rank's float64 count, mean and sum of squared deviations, one
    all-reduce of ``[world, 3]`` values, and their exact pairwise combination in rank order
    (so every rank gets bitwise the same statistics); then this rank's ``x`` is whitened with
    them in float64. Every rank of the group must call it.

    Args:
        x: float tensor, any shape. mask: same shape, bool or integer (nonzero = true).
        process_group: a ``torch.distributed`` group, or None (the statistics of this ``x``).
    Returns:
        float32 tensor shaped like ``x``.
    """
    op = "masked_whiten"
    name = _backend.pick(backend, x, op, "x")
    if process_group is not None:
        return _masked_whiten_group(op, x, mask, shift_mean, unbiased, eps, process_group)
    if name in NATIVE:
        try:
            return _masked_whiten(x, mask, shift_mean, unbiased, eps)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
    v.floats(op, ("x",), (x,), mask=mask)
    eps = v.number(op, "eps", eps, lo=0.0)
    xf, m = v.as_f32(x), v.as_mask(mask)
    if name == "torch":
        return ref.masked_whiten(xf.double(), m, bool(shift_mean), bool(unbiased), eps).float()
    from rlhf_kernels.triton import gae as tri
    return tri.masked_whiten(xf, m, bool(shift_mean), bool(unbiased), eps)



def _masked_whiten_group(op, x, mask, shift_mean, unbiased, eps, group):
    """masked_whiten over every rank's entries (see its docstring): local moments, one
    all-reduce, the parallel-variance combination (the same on every rank), whitening in float64."""
    import torch.distributed as dist
    v.floats(op, ("x",), (x,), mask=mask)
    eps = v.number(op, "eps", eps, lo=0.0)
    xd, m = v.as_f32(x).double(), v.as_mask(mask)
    # no host sync: masked sums instead of boolean indexing, the combine on the device
    n = m.sum(dtype=torch.float64)
    xm = torch.where(m, xd, torch.zeros_like(xd))       # masked-out entries, NaN or not, count 0
    mean = xm.sum() / n.clamp(min=1)
    m2 = torch.where(m, (xd - mean) ** 2, torch.zeros_like(xd)).sum()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    comm = x.device if x.is_cuda and "nccl" in str(dist.get_backend(group)) else torch.device("cpu")
    parts = torch.zeros(world, 3, dtype=torch.float64, device=comm)
    parts[me] = torch.stack([n, mean, m2]).to(comm)
    dist.all_reduce(parts, group=group)      # a sum with zeros elsewhere: every rank's row, exactly
    parts = parts.to(xd.device)
    n_r, mean_r, m2_r = parts.unbind(1)
    n_all = n_r.sum()
    mean_all = (n_r * mean_r).sum() / n_all.clamp(min=1)
    m2_all = (m2_r + n_r * (mean_r - mean_all) ** 2).sum()   # the parallel-variance identity
    denom = n_all - 1 if unbiased else n_all
    var = torch.where(denom > 0, m2_all / denom.clamp(min=1), torch.zeros_like(m2_all))
    out = (xd - mean_all) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean_all
    return torch.where(m, out, torch.zeros_like(out)).float()


# ---- output shapes of the native ops and their Triton twins (rlhf_kernels/_signatures.py) ----

@shape("gae", "gae_packed")
def _gae_shapes(rewards, **_):
    return f32(rewards, rewards.shape), f32(rewards, rewards.shape)


@shape("masked_whiten")
def _masked_whiten_shape(x, **_):
    return f32(x, x.shape)
