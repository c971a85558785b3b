"""Vocabulary-parallel linear_policy_loss (``process_group=``), on gloo with 2 and 3 processes.

Each world size is one ``torch.multiprocessing`` spawn (file init, one thread per process): every
rank runs every case on every CPU backend with its slice of the LM head, rows
[r * V_LOCAL, (r + 1) * V_LOCAL) of weight and bias, and saves what it got; the tests here
compare those with the float64 reference through the whole [B, T, V] logits
(rlhf_kernels/reference/linear_policy.py), computed in this process:
- logp: LOGP_ATOL (float32 logits of size ~3 over V <= 15: a few float32 ulps of the log-sum);
- the loss, and the entropy and kl means: LOSS_ATOL plus LOSS_RTOL of their size;
- the policy statistics: exactly ppo_policy_loss's on the returned logp (same backend), as in
  test_linear_policy.py (a ratio at a clip edge may fall either side in float32);
- d_weight and d_bias: this rank's slice of the whole gradient; d_hidden summed over the ranks
  (the caller's all-reduce) equals the whole d_hidden; GRAD_ATOL of the largest entry;
- loss, stats and logp bitwise the same on every rank;
- per call, the collectives (c10d ops seen by a dispatch mode) and the bytes each rank puts in:
  one collective of O(B*T) float32 values in the forward, none in the backward;
- matmul FLOPs (torch.profiler, every aten matmul, also those inside the native ops): 2NHV/TP
  in the forward, 6NHV/TP in the backward (6NH(V/TP + 1) on the kernel backends: one sink
  row), N counting the rows each backend pads its row blocks to.
"""

import datetime
import os
import sys
import tempfile
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlhf_kernels as rk
from rlhf_kernels import _backend
from rlhf_kernels._layout import LINEAR_POLICY_STATS, POLICY_STATS
from rlhf_kernels.reference import linear_policy as ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_vocab_parallel import Collectives as _Collectives  # noqa: E402  (one collective counter for both)

B, T, H, V_LOCAL = 3, 6, 8, 5
BACKENDS = _backend.available("cpu")  # torch, cpu (when built), triton (the interpreter)
LOGP_ATOL = 2e-5
LOSS_ATOL, LOSS_RTOL = 2e-5, 1e-5
GRAD_ATOL = 2e-5
# N for the FLOP count (a multiple of the CPU op's row block: there the count is exactly 8NHV/TP
# plus the sink row)
FLOP_B, FLOP_T = 4, 64

# (name, linear_policy_loss keywords): every loss_agg, GSPO, the options; "bias"/"grad" switches
CASES = {
    "token-mean": dict(temperature=0.7, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, dual_clip=3.0),
    "seq-mean-token-mean": dict(loss_agg="seq-mean-token-mean", entropy_coef=0.02, clip_high=0.28),
    "seq-mean-token-sum": dict(loss_agg="seq-mean-token-sum", kl_coef=0.05, kl_kind="k2", temperature=1.3),
    "seq-mean-token-sum-norm": dict(loss_agg="seq-mean-token-sum-norm", entropy_coef=0.01),
    "token-sum": dict(loss_agg="token-sum", kl_coef=0.2, kl_kind="abs"),
    "gspo": dict(ratio_level="sequence", loss_agg="seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4,
                 kl_coef=0.1, kl_kind="k1", entropy_coef=0.01, temperature=0.9),
    "num-tokens": dict(num_tokens=40.0, temperature=1.1, no_bias=True),
    "cispo-tis": dict(objective="cispo", is_correction="tis", is_cap=2.0, rollout=True, entropy_coef=0.01),
    "no-grad": dict(kl_coef=0.1, kl_kind="k3", no_grad=True),
}
# every case at TP = 2; at TP = 3 (3 processes on the CI's cores) a few; the Triton interpreter
# (slow) runs a few at each
TP3_CASES = ("token-mean", "gspo", "seq-mean-token-sum-norm", "no-grad")
TRITON_CASES = ("token-mean", "gspo", "seq-mean-token-mean", "cispo-tis")


def _cases(world, backend):
    names = CASES if world == 2 else TP3_CASES
    return [n for n in names if backend != "triton" or n in TRITON_CASES]
F64 = torch.float64


def _inputs(name, world, b=B, t=T):
    """The whole problem of a case, the same in every process: hidden [b, t, H], weight [V, H],
    bias [V] (or None), labels (global ids, garbage where masked, at least one valid token per
    shard), mask (right padding and a fully masked row), old/ref/rollout logprobs near the
    exact logp, advantages of both signs; float32."""
    gen = torch.Generator().manual_seed(zlib.crc32(("%s/%d" % (name, world)).encode()))
    V = V_LOCAL * world
    h = torch.randn(b, t, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * (3.0 / H ** 0.5)
    bias = None if CASES.get(name, {}).get("no_bias") else torch.randn(V, generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.8
    mask[1] = False
    mask[0, -2:] = False
    y = torch.randint(0, V, (b, t), generator=gen)
    for r in range(world):  # a label in every shard
        mask[0, r] = True
        y[0, r] = r * V_LOCAL + (r + 1) % V_LOCAL
    junk = torch.tensor([-100, V, -7, V + 1000])[torch.randint(0, 4, (b, t), generator=gen)]
    y = torch.where(mask, y, junk)
    with torch.no_grad():
        logits = (h.double() @ w.double().T + (0 if bias is None else bias.double()))
        logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    old = (logp + 0.3 * torch.randn(b, t, generator=gen, dtype=F64)).float()
    ref_lp = (logp + 0.2 * torch.randn(b, t, generator=gen, dtype=F64)).float()
    roll = (logp + 0.3 * torch.randn(b, t, generator=gen, dtype=F64)).float()
    adv = 2 * torch.randn(b, t, generator=gen)
    return dict(h=h, w=w, b=bias, y=y, mask=mask, old=old, ref=ref_lp, roll=roll, adv=adv)


def _kwargs(name, x):
    """linear_policy_loss's keywords for a case (the switches turned into tensors)."""
    kw = {k: v for k, v in CASES[name].items() if k not in ("no_bias", "no_grad", "rollout")}
    if kw.get("kl_coef", 0) > 0:
        kw["ref_logprobs"] = x["ref"]
    if CASES[name].get("rollout"):
        kw["rollout_logprobs"] = x["roll"]
    return kw


def _local(x, rank):
    sl = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    return x["w"][sl], None if x["b"] is None else x["b"][sl]


# ---- the collectives and FLOPs of a call

_MATMULS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2)}


def _matmul_flops(prof):
    """2 M K N over every aten matmul the profiler saw (those inside native ops included)."""
    total = 0
    for e in prof.events():
        if e.name in _MATMULS:
            a, b = (e.input_shapes[i] for i in _MATMULS[e.name])
            total += 2 * a[0] * a[1] * b[1]
    return total


# ---- the worker: one process of a world

def _call(x, name, rank, group, backend, whole=False):
    """One linear_policy_loss forward and backward on this rank's slice (or the whole head):
    a dict of its outputs, gradients and the collectives of each half."""
    w, b = (x["w"], x["b"]) if whole else _local(x, rank)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x["h"], w, b)]
    grad = not CASES.get(name, {}).get("no_grad")
    fwd, bwd = _Collectives(), _Collectives()
    with torch.set_grad_enabled(grad), fwd:
        loss, stats = rk.linear_policy_loss(leaves[0], leaves[1], x["y"], x["old"], x["adv"], x["mask"],
                                            bias=leaves[2], process_group=group, backend=backend, **_kwargs(name, x))
    if grad:
        with bwd:
            loss.backward()
    out = dict(loss=loss.detach(), packed=stats.packed.clone(), logp=stats["logprobs"].clone(), fwd=fwd.calls,
               bwd=bwd.calls)
    for key, t in zip(("dh", "dw", "db"), leaves):
        out[key] = None if t is None else t.grad
    return out


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a hang fails, never blocks
    try:
        singles = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
        res = {}
        for backend in BACKENDS:
            for name in _cases(world, backend):
                res[backend, name] = _call(_inputs(name, world), name, rank, dist.group.WORLD, backend)
            # a group of one (this rank alone, the whole head) against no group: the same bits
            x = _inputs("token-mean", world)
            res[backend, "single"] = _call(x, "token-mean", rank, singles[rank], backend, whole=True)
            res[backend, "none"] = _call(x, "token-mean", rank, None, backend, whole=True)
            # a label outside [0, V_global) where the mask is set: a ValueError on every rank
            # (labels in other shards, V_LOCAL <= y < V, are valid: every case has them)
            bad = dict(x, y=x["y"].clone())
            bad["y"][0, 0] = V_LOCAL * world
            try:
                _call(bad, "token-mean", rank, dist.group.WORLD, backend)
                res[backend, "bad"] = "no error"
            except ValueError as e:
                res[backend, "bad"] = str(e)
            # matmul FLOPs of the forward and the backward at N = FLOP_B * FLOP_T
            xf = _inputs("flops", world, FLOP_B, FLOP_T)
            w, b = _local(xf, rank)
            leaves = [t.clone().requires_grad_(True) for t in (xf["h"], w, b)]
            acts = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=acts, record_shapes=True) as pf:
                loss, _ = rk.linear_policy_loss(leaves[0], leaves[1], xf["y"], xf["old"], xf["adv"], xf["mask"],
                                                bias=leaves[2], entropy_coef=0.01, process_group=dist.group.WORLD,
                                                backend=backend)
            with torch.profiler.profile(activities=acts, record_shapes=True) as pb:
                loss.backward()
            res[backend, "flops"] = (_matmul_flops(pf), _matmul_flops(pb))
        torch.save(res, os.path.join(out_dir, "rank%d.pt" % rank))
    finally:
        dist.destroy_process_group()


_RESULTS = {}


def _results(world):
    """[rank] -> the worker's results, one spawn per world size for the whole module."""
    if world not in _RESULTS:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, os.path.join(d, "init"), d), nprocs=world, join=True)
            _RESULTS[world] = [torch.load(os.path.join(d, "rank%d.pt" % r), weights_only=False)
                               for r in range(world)]
    return _RESULTS[world]


# ---- the float64 reference through the whole logits

def _reference(name, world):
    x = _inputs(name, world)
    kw = _kwargs(name, x)
    for key in ("ref_logprobs", "rollout_logprobs"):
        if key in kw:
            kw[key] = kw[key].double()
    if "rollout_logprobs" in kw:
        kw.setdefault("is_level", "token")
    leaves = [None if t is None else t.double().requires_grad_(True) for t in (x["h"], x["w"], x["b"])]
    loss, stats, logp = ref.linear_policy_loss(leaves[0], leaves[1], x["y"], x["old"].double(), x["adv"].double(),
                                               x["mask"], bias=leaves[2], **kw)
    loss.backward()
    return x, loss.detach(), stats, logp, [None if t is None else t.grad for t in leaves]


def _close(got, want, atol, rtol=0.0, what=""):
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    assert bool((err <= bound).all()), "%s: max error %.3g (bound %.3g)" % (what, err.max(), bound.max())


WORLDS = [pytest.param(2, id="tp2"), pytest.param(3, id="tp3")]
WORLD_CASES = [pytest.param(w, b, n, id="tp%d-%s-%s" % (w, b, n)) for w in (2, 3) for b in BACKENDS
               for n in _cases(w, b)]


@pytest.mark.parametrize("world,backend,name", WORLD_CASES)
def test_matches_whole_vocabulary(world, backend, name):
    ranks = [r[backend, name] for r in _results(world)]
    x, loss, stats, logp, grads = _reference(name, world)
    mask = x["mask"]
    first = ranks[0]
    for r, got in enumerate(ranks):  # bitwise the same on every rank
        for key in ("loss", "packed", "logp"):
            assert torch.equal(got[key], first[key]), "rank %d's %s differs from rank 0's" % (r, key)
    _close(first["logp"], torch.where(mask, logp, 0.0), LOGP_ATOL, what="logp")
    assert bool((first["logp"][~mask] == 0).all())
    _close(first["loss"], loss, LOSS_ATOL, LOSS_RTOL, what="loss")
    got = dict(zip(LINEAR_POLICY_STATS, first["packed"]))
    for k in ("entropy", "kl"):
        _close(got[k], stats[k], LOSS_ATOL, LOSS_RTOL, what=k)
    kw = {k: v for k, v in _kwargs(name, x).items() if k not in ("temperature", "kl_coef", "kl_kind", "entropy_coef",
                                                                  "ref_logprobs")}
    _, pstats = rk.ppo_policy_loss(first["logp"], x["old"], x["adv"], mask, backend=backend, **kw)
    for k in POLICY_STATS:
        assert torch.equal(got[k], pstats[k]), "%s: %r against ppo_policy_loss's %r" % (k, got[k], pstats[k])
    if CASES[name].get("no_grad"):
        assert all(got[k] is None for got in ranks for k in ("dh", "dw", "db"))
        return
    dh, dw, db = grads
    scale = max(float(g.abs().max()) for g in grads if g is not None)
    for r, got in enumerate(ranks):  # this rank's slice of the whole gradients
        sl = slice(r * V_LOCAL, (r + 1) * V_LOCAL)
        _close(got["dw"], dw[sl], GRAD_ATOL * scale, what="rank %d d_weight" % r)
        if db is not None:
            _close(got["db"], db[sl], GRAD_ATOL * scale, what="rank %d d_bias" % r)
    _close(sum(got["dh"].double() for got in ranks), dh, GRAD_ATOL * scale, what="all-reduced d_hidden")


@pytest.mark.parametrize("world,backend,name", WORLD_CASES)
def test_one_collective_forward_none_backward(world, backend, name):
    """One collective of O(N) float32 values per forward (at most 4 per token), none in the
    backward, on every rank."""
    N = B * T
    for r, got in enumerate(_results(world)):
        calls = got[backend, name]
        assert len(calls["fwd"]) == 1, "rank %d forward collectives: %s" % (r, calls["fwd"])
        assert 0 < calls["fwd"][0][1] <= 4 * 4 * N, "rank %d forward bytes: %s" % (r, calls["fwd"])
        assert calls["bwd"] == [], "rank %d backward collectives: %s" % (r, calls["bwd"])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_of_one_is_no_group(world, backend):
    for got in _results(world):
        one, none = got[backend, "single"], got[backend, "none"]
        for key in ("loss", "packed", "logp", "dh", "dw", "db"):
            assert torch.equal(one[key], none[key]), key
        assert one["fwd"] == [] and one["bwd"] == []


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_outside_the_whole_vocabulary_raises(world, backend):
    V = V_LOCAL * world
    for got in _results(world):
        msg = got[backend, "bad"]
        assert "linear_policy_loss" in msg and "[0, %d)" % V in msg and "labels[0, 0] = %d" % V in msg, msg


# Every backend multiplies whole row blocks for the logits (the last one padded, for batch
# invariance, as without a group): up to 256 rows on the CPU, 2048 for Triton and CUDA; the
# d_weight product takes the real rows. The kernel backends' gradient pass multiplies by the local
# head with one more row (the "sink" of ops/_vocab_parallel.py: zero weights, where the one-hot
# term of a label another rank owns lands), so V/TP + 1 there; the torch backend adds that term apart.
ROW_BLOCK = {"torch": 1, "cpu": 256, "triton": 2048, "cuda": 2048}
SINK_ROWS = {"torch": 0, "cpu": 1, "triton": 1, "cuda": 1}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flops_8nhv_over_tp(world, backend):
    """The statistics pass is 2NHV/TP, the gradient pass (recomputed local logits, d_hidden,
    d_weight) 6NHV/TP: 8NHV/TP per rank (V/TP = V_LOCAL), N counting the padded rows of the
    logits products, plus the sink row in the backward."""
    n = FLOP_B * FLOP_T
    n_pad = -(-n // ROW_BLOCK[backend]) * ROW_BLOCK[backend]
    v_bwd = V_LOCAL + SINK_ROWS[backend]
    want = (2 * n_pad * H * V_LOCAL, 2 * n_pad * H * v_bwd * 2 + 2 * n * H * v_bwd)
    for r, got in enumerate(_results(world)):
        assert got[backend, "flops"] == want, "rank %d: (forward, backward) FLOPs %s, expected %s" % (
            r, got[backend, "flops"], want)


def _nccl_worker(rank, world, init_file, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a hang fails, never blocks
    try:
        res = {}
        for backend in _backend.available("cuda"):
            for name in ("token-mean", "gspo", "seq-mean-token-sum"):
                x = {k: None if t is None else t.cuda() for k, t in _inputs(name, world).items()}
                got = _call(x, name, rank, dist.group.WORLD, backend)
                res[backend, name] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in got.items()}
        torch.save(res, os.path.join(out_dir, "rank%d.pt" % rank))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more GPUs")
def test_nccl_matches_whole_vocabulary():
    world = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_nccl_worker, args=(world, os.path.join(d, "init"), d), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(d, "rank%d.pt" % r), weights_only=False) for r in range(world)]
    for key in ranks[0]:
        name = key[1]
        x, loss, stats, logp, (dh, dw, db) = _reference(name, world)
        got = [r[key] for r in ranks]
        assert all(torch.equal(g["loss"], got[0]["loss"]) and torch.equal(g["logp"], got[0]["logp"]) for g in got)
        _close(got[0]["logp"], torch.where(x["mask"], logp, 0.0), LOGP_ATOL, what="%s logp" % (key,))
        _close(got[0]["loss"], loss, LOSS_ATOL, LOSS_RTOL, what="%s loss" % (key,))
        scale = float(dw.abs().max())
        for r, g in enumerate(got):
            _close(g["dw"], dw[r * V_LOCAL:(r + 1) * V_LOCAL], GRAD_ATOL * scale, what="%s d_weight" % (key,))
        _close(sum(g["dh"].double() for g in got), dh, GRAD_ATOL * max(scale, float(dh.abs().max())),
               what="%s d_hidden" % (key,))
        assert all(len(g["fwd"]) == 1 and g["bwd"] == [] for g in got)
