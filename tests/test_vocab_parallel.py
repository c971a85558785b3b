"""Vocabulary-parallel log-probs, entropy, KL and linear_token_logprobs (``process_group=``).

The convention (Megatron's): rank r of W holds vocabulary ids [r * V_local, (r + 1) * V_local);
labels are global. Each multi-process test spawns W gloo processes (torch.multiprocessing, file
init, one thread each); every rank draws the same full-vocabulary inputs from one seed, keeps its
slice, and compares with a float64 evaluation on the whole vocabulary, on every CPU backend
(torch, cpu, triton under the interpreter). Outputs must be bitwise the same on every rank.
NCCL runs of the same worker are marked `cuda` and skip with fewer than two GPUs.
"""

import math
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlhf_kernels as rk
from rlhf_kernels import _backend
from rlhf_kernels.ops import _vocab_parallel as vp

ATOL, RTOL = 1e-5, 1e-5          # float32 kernels against float64 on O(1) log-probs
GRAD_ATOL = 1e-6                 # gradients: entries are O(1/V)
V_LOCAL = 5                      # not a multiple of any block
TEMPERATURE = 0.7
IGNORE = -100
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "isend",
               "irecv", "reduce", "gather", "scatter", "barrier")


# ---- the combine, on one process: shards simulated by slicing ----

def _shard_stats(s):
    m = s.amax(-1)
    log_d = torch.log(torch.exp(s - m[:, None]).sum(-1))
    p = torch.softmax(s, -1)
    h = -(p * torch.log_softmax(s, -1)).sum(-1)
    return m.float(), log_d.float(), h.float()


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_combine_softmax_equals_the_whole_vocabulary(W):
    g = torch.Generator().manual_seed(W)
    s = torch.randn(6, 7 * W, generator=g, dtype=torch.float64) * 4
    if W > 1:
        s[0, :7] = -math.inf  # a shard with only -inf logits adds nothing
    parts = [_shard_stats(s[:, r * 7:(r + 1) * 7]) for r in range(W)] if W > 1 else [_shard_stats(s)]
    if W > 1:  # row 0's first shard has d = 0: its stats as the kernels give them
        parts[0] = tuple(t.clone() for t in parts[0])
        parts[0][0][0], parts[0][1][0], parts[0][2][0] = -math.inf, -math.inf, math.nan
    m, log_d, h = (torch.stack(c) for c in zip(*parts))
    stats, ent, log_pi = vp.combine_softmax(m, log_d, h)
    lse = torch.logsumexp(s, -1)
    ref_h = -(torch.softmax(s, -1) * torch.log_softmax(s, -1)).nan_to_num().sum(-1)
    torch.testing.assert_close(ent.double(), ref_h, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close((stats[:, 0] + stats[:, 1]).double(), lse, atol=ATOL, rtol=RTOL)
    assert torch.equal(stats[:, 0], s.amax(-1).float())
    assert log_pi.shape == (W, 6)


@pytest.mark.parametrize("W", [2, 3])
def test_combine_kl_equals_the_whole_vocabulary(W):
    g = torch.Generator().manual_seed(10 + W)
    s = torch.randn(5, 4 * W, generator=g, dtype=torch.float64) * 3
    r = s + torch.randn(5, 4 * W, generator=g, dtype=torch.float64) * 0.5
    cols = []
    for k in range(W):
        a, b = s[:, 4 * k:4 * k + 4], r[:, 4 * k:4 * k + 4]
        kl = (torch.softmax(a, -1) * (torch.log_softmax(a, -1) - torch.log_softmax(b, -1))).sum(-1)
        ma, lda, _ = _shard_stats(a)
        mb, ldb, _ = _shard_stats(b)
        cols.append((ma, lda, mb, ldb, kl.float()))
    stats, kl = vp.combine_kl(*(torch.stack(c) for c in zip(*cols)))
    ref = (torch.softmax(s, -1) * (torch.log_softmax(s, -1) - torch.log_softmax(r, -1))).sum(-1)
    torch.testing.assert_close(kl.double(), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close((stats[:, 2] + stats[:, 3]).double(), torch.logsumexp(r, -1), atol=ATOL, rtol=RTOL)


def test_localize_labels():
    shard = vp.VocabShard(None, 1, 3, 4, 4)
    y = torch.tensor([0, 4, 7, 8, 11, IGNORE, 12, -2])
    lab = vp.localize_labels(y, shard, IGNORE)
    assert lab.local.tolist() == [0, 0, 3, 0, 0, 0, 0, 0]
    assert lab.sink.tolist() == [4, 0, 3, 4, 4, -1, -1, -1]
    assert lab.owner.tolist() == [0, 1, 1, 2, 2, 0, 0, 0]
    assert lab.mine.tolist() == [False, True, True, False, False, False, False, False]
    assert lab.valid.tolist() == [True] * 5 + [False] * 3
    assert lab.ignored.tolist() == [False] * 5 + [True, False, False]


def test_no_group_and_uninitialized():
    z = torch.randn(3, 4)
    y = torch.tensor([0, 1, 3])
    assert torch.equal(rk.token_logprobs(z, y, process_group=None), rk.token_logprobs(z, y))
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="process_group"):
            rk.token_logprobs(z, y, process_group=object())


# ---- W processes with gloo ----

def _worker(rank, world, init_file, check, backends, device):
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="file://" + init_file,
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    if device == "cuda":
        torch.cuda.set_device(rank)
    try:
        CHECKS[check](rank, world, backends, device)
    finally:
        dist.destroy_process_group()


def _spawn(world, check, backends, device="cpu"):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, os.path.join(d, "init"), check, backends, device), nprocs=world,
                           join=True, start_method="spawn")


def _cpu_backends():
    return tuple(_backend.available("cpu"))


def _same_on_all_ranks(t):
    """Bitwise, NaN included."""
    bits = t.detach().contiguous().float().view(torch.int32)
    got = [torch.empty_like(bits) for _ in range(dist.get_world_size())]
    dist.all_gather(got, bits)
    for other in got:
        assert torch.equal(other, bits), "outputs differ across ranks"


def _close(got, want, atol=ATOL):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=RTOL, equal_nan=True)


def _inputs(world, device, seed=0):
    """Full-vocabulary inputs, the same on every rank: logits [2, 3, V], ref logits, labels [2, 3]
    in every shard (the first and last id of the vocabulary, one per shard) and one ignored."""
    g = torch.Generator().manual_seed(1000 * world + seed)
    V = V_LOCAL * world
    z = torch.randn(2, 3, V, generator=g) * 3
    zr = z + torch.randn(2, 3, V, generator=g) * 0.5
    ids = [0, V - 1, IGNORE] + [r * V_LOCAL + int(torch.randint(V_LOCAL, (), generator=g)) for r in range(world)]
    y = torch.tensor((ids * 2)[:6]).view(2, 3)
    gl, gh = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    return [t.to(device) for t in (z, zr, y, gl, gh)]


def _ref_logprobs(z, y):
    """float64 (logp, entropy) on the whole vocabulary; 0 at ignored positions."""
    lsm = torch.log_softmax(z.double() / TEMPERATURE, -1)
    keep = y != IGNORE
    lp = lsm.gather(-1, torch.where(keep, y, 0).unsqueeze(-1))[..., 0]
    h = -(lsm.exp() * lsm).sum(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, h, 0.0), h


def _check_logits_ops(rank, world, backends, device):
    z, zr, y, gl, gh = _inputs(world, device)
    sl = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    z64 = z.double().requires_grad_()
    lp_ref, h_ref, h_all = _ref_logprobs(z64, y)
    g_lp_ref, = torch.autograd.grad((lp_ref * gl + h_ref * gh).sum(), z64, retain_graph=True)
    g_h_ref, = torch.autograd.grad((h_all * gh).sum(), z64)
    p, lq = torch.softmax(z64 / TEMPERATURE, -1), torch.log_softmax(zr.double() / TEMPERATURE, -1)
    kl_ref = (p * (torch.log(p) - lq)).sum(-1)
    g_kl_ref, = torch.autograd.grad((kl_ref * gl).sum(), z64)
    pg = dist.group.WORLD
    for b in backends:
        zl = z[..., sl].clone().requires_grad_()
        lp, h = rk.token_logprobs(zl, y, temperature=TEMPERATURE, return_entropy=True, process_group=pg, backend=b)
        _close(lp, lp_ref)
        _close(h, h_ref)
        _same_on_all_ranks(lp)
        _same_on_all_ranks(h)
        (lp * gl + h * gh).sum().backward()
        _close(zl.grad, g_lp_ref[..., sl], GRAD_ATOL)
        if b != "torch":  # inplace_backward: the same gradient, written over the logits
            zi = z[..., sl].clone().requires_grad_()
            lp2, h2 = rk.token_logprobs(zi * 1, y, temperature=TEMPERATURE, return_entropy=True, process_group=pg,
                                        inplace_backward=True, backend=b)
            (lp2 * gl + h2 * gh).sum().backward()
            assert torch.equal(zi.grad, zl.grad), b
        zl = z[..., sl].clone().requires_grad_()
        h = rk.token_entropy(zl, temperature=TEMPERATURE, process_group=pg, backend=b)
        _close(h, h_all)
        _same_on_all_ranks(h)
        (h * gh).sum().backward()
        _close(zl.grad, g_h_ref[..., sl], GRAD_ATOL)
        zl = z[..., sl].clone().requires_grad_()
        kl = rk.full_kl(zl, zr[..., sl], temperature=TEMPERATURE, process_group=pg, backend=b)
        _close(kl, kl_ref)
        _same_on_all_ranks(kl)
        (kl * gl).sum().backward()
        _close(zl.grad, g_kl_ref[..., sl], GRAD_ATOL)
        # a label outside [0, V_global) raises; with validate=False it gives NaN and no gradient
        for bad in (V_LOCAL * world, -3):
            yb = y.clone()
            yb[1, 2] = bad
            with pytest.raises(ValueError, match="labels"):
                rk.token_logprobs(zl, yb, process_group=pg, backend=b)
            zb = z[..., sl].clone().requires_grad_()
            lp, h = rk.token_logprobs(zb, yb, temperature=TEMPERATURE, return_entropy=True, validate=False,
                                      process_group=pg, backend=b)
            assert lp[1, 2].isnan() and h[1, 2].isnan() and not lp[0].isnan().any(), b
            _same_on_all_ranks(lp)
            (lp.nan_to_num() + h.nan_to_num()).sum().backward()
            assert not zb.grad[1, 2].any() and zb.grad[0].abs().sum() > 0, b


def _check_linear(rank, world, backends, device):
    z, _, y, gl, gh = _inputs(world, device, seed=1)
    g = torch.Generator().manual_seed(7 + world)
    H = 4
    V = V_LOCAL * world
    hidden = torch.randn(2, 3, H, generator=g).to(device)
    weight = torch.randn(V, H, generator=g).to(device)
    bias = torch.randn(V, generator=g).to(device)
    sl = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    for with_bias in (True, False):
        h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
        logits = h64 @ w64.t() + (b64 if with_bias else 0)
        lp_ref, h_ref, _ = _ref_logprobs(logits, y)
        refs = torch.autograd.grad((lp_ref * gl + h_ref * gh).sum(), (h64, w64, b64), allow_unused=True)
        for b in backends:
            hid = hidden.clone().requires_grad_()
            w = weight[sl].clone().requires_grad_()
            bb = bias[sl].clone().requires_grad_() if with_bias else None
            lp, h = rk.linear_token_logprobs(hid, w, y, bias=bb, temperature=TEMPERATURE, return_entropy=True,
                                             process_group=dist.group.WORLD, backend=b)
            _close(lp, lp_ref)
            _close(h, h_ref)
            _same_on_all_ranks(lp)
            _same_on_all_ranks(h)
            (lp * gl + h * gh).sum().backward()
            d_hidden = hid.grad.clone()
            dist.all_reduce(d_hidden)  # d_hidden is this rank's partial sum: the caller reduces it
            _close(d_hidden, refs[0], GRAD_ATOL * 10)
            _close(w.grad, refs[1][sl], GRAD_ATOL * 10)
            if with_bias:
                _close(bb.grad, refs[2][sl], GRAD_ATOL * 10)
            yb = y.clone()
            yb[0, 0] = V
            with pytest.raises(ValueError, match="labels"):
                rk.linear_token_logprobs(hid, w, yb, bias=bb, process_group=dist.group.WORLD, backend=b)


def _check_group_of_one(rank, world, backends, device):
    z, zr, _, gl, _ = _inputs(world, device, seed=2)
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    one = groups[rank]
    zl, zrl = z[..., :V_LOCAL], zr[..., :V_LOCAL]
    y = torch.arange(6, device=device).view(2, 3) % V_LOCAL
    y[0, 1] = IGNORE
    w = torch.randn(V_LOCAL, 4, device=device)
    hid = torch.randn(2, 3, 4, device=device)
    for b in backends:
        calls = [
            lambda g: rk.token_logprobs(zl, y, temperature=TEMPERATURE, return_entropy=True, process_group=g,
                                        backend=b),
            lambda g: (rk.token_entropy(zl, temperature=TEMPERATURE, process_group=g, backend=b),),
            lambda g: (rk.full_kl(zl, zrl, temperature=TEMPERATURE, process_group=g, backend=b),),
            lambda g: rk.linear_token_logprobs(hid, w, y, return_entropy=True, process_group=g, backend=b),
        ]
        for f in calls:
            for got, want in zip(f(one), f(None)):
                assert torch.equal(got, want), b


def _count_collectives():
    """Wrap every torch.distributed collective: -> the list of (name, bytes received) calls."""
    calls, depth = [], [0]

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if depth[0] == 0:
                out = args[0] if args else None
                nbytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else None
                calls.append((name, nbytes))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    return calls


def _check_counts(rank, world, backends, device):
    z, zr, y, gl, gh = _inputs(world, device, seed=3)
    sl = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    N = y.numel()
    pg = dist.group.WORLD
    hid = torch.randn(2, 3, 4, device=device)
    w = torch.randn(V_LOCAL, 4, device=device)
    bias = torch.randn(V_LOCAL, device=device)
    calls = _count_collectives()
    ops = {  # op -> (forward, float32 values per row in the one all-gather)
        "token_logprobs": (lambda b, x: sum(rk.token_logprobs(x, y, return_entropy=True, process_group=pg,
                                                               backend=b)), 4),
        "token_entropy": (lambda b, x: rk.token_entropy(x, process_group=pg, backend=b), 3),
        "full_kl": (lambda b, x: rk.full_kl(x, zr[..., sl], process_group=pg, backend=b), 5),
        "linear_token_logprobs": (lambda b, x: sum(rk.linear_token_logprobs(
            hid + x.sum() * 0, w + x.sum() * 0, y, bias=bias, return_entropy=True, process_group=pg, backend=b)), 4),
    }
    for b in backends:
        for op, (f, k) in ops.items():
            x = z[..., sl].clone().requires_grad_()
            del calls[:]
            out = f(b, x)
            assert [c[0] for c in calls] in (["all_gather_single"], ["all_gather_into_tensor"]), (op, b, calls)
            assert calls[0][1] == world * N * k * 4, (op, b, calls)
            del calls[:]
            (out * gl).sum().backward()
            assert calls == [], (op, b, "backward", calls)
    # torch.compile: the vocabulary-parallel op is a graph break (run eagerly, one collective);
    # the compiled function gives the eager values and gradients, and fullgraph=True refuses it
    # (aot_eager: dynamo and autograd as with inductor, without its slow C++ code generation here)
    for b in backends:
        x = z[..., sl].clone().requires_grad_()
        eager = rk.token_logprobs(x, y, temperature=TEMPERATURE, process_group=pg, backend=b) * gl
        g_eager, = torch.autograd.grad(eager.sum(), x)
        fn = torch.compile(lambda t: rk.token_logprobs(t * 1, y, temperature=TEMPERATURE, process_group=pg,
                                                       backend=b) * gl, backend="aot_eager")
        del calls[:]
        out = fn(x)
        assert len(calls) == 1, calls
        g_compiled, = torch.autograd.grad(out.sum(), x)
        assert torch.equal(out, eager) and torch.equal(g_compiled, g_eager), b
    full = torch.compile(lambda t: rk.token_entropy(t, process_group=pg), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="(?i)skip|disable|graph break"):
        full(z[..., sl])
    torch._dynamo.reset()


def _check_all(rank, world, backends, device):
    _check_logits_ops(rank, world, backends, device)
    _check_linear(rank, world, backends, device)


def _check_one_and_counts(rank, world, backends, device):
    _check_group_of_one(rank, world, backends, device)
    _check_counts(rank, world, backends, device)


CHECKS = {"all": _check_all, "one_and_counts": _check_one_and_counts}


@pytest.mark.parametrize("world", [2, 3])
def test_every_op_every_backend(world):
    """The four ops against float64 on the whole vocabulary: labels in every shard, ignored labels,
    a temperature, bias, gradients, outputs identical across ranks, bad labels."""
    _spawn(world, "all", _cpu_backends())


def test_group_of_one_and_one_collective_per_forward():
    """A group of one equals no group (bitwise); each op makes one all-gather of N * K float32 per
    forward and no collective in the backward; the compiled op gives the eager result."""
    _spawn(2, "one_and_counts", _cpu_backends())


def _gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.cuda
@pytest.mark.skipif(_gpus() < 2, reason="needs two or more GPUs")
@pytest.mark.parametrize("check", ["all", "one_and_counts"])
def test_nccl(check):
    _spawn(2, check, tuple(_backend.available("cuda")), device="cuda")
