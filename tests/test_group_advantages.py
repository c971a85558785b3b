"""group_advantages: every available backend against the float64 reference
(rlhf_kernels/reference/group_advantages.py), the reference against an independent loop, NaN
confinement, determinism, bad inputs, opcheck and torch.compile; CUDA-marked tests for the
cuda kernels' paths (one block, sort + cooperative, groups spanning parts), graph capture and
no host sync."""

import pathlib
import re
import statistics

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend
from rlhf_kernels.tolerances import GROUP_ADV_ATOL_FRAC, GROUP_ADV_RTOL
from rlhf_kernels.reference import group_advantages as ref
from tests.conftest import device_backends, native_devices
from tests._helpers import make_mask, needs_native_cuda_op

BACKENDS = device_backends()
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[1] != "torch"]
MODES = ["grpo", "dr_grpo", "rloo", "reinforce++"]


pytestmark = pytest.mark.usefixtures("poison_empty")


def rand(gen, n):
    return torch.randn(n, generator=gen, dtype=torch.float64).float()


def expected(rewards, group_index=None, group_size=None, mode="grpo", eps=1e-6):
    """The reference in float64 on the (upcast) inputs, on the CPU."""
    gi = None if group_index is None else group_index.cpu().to(torch.int64)
    return ref.group_advantages(rewards.cpu().double(), gi, group_size, mode, eps)


def assert_close(out, exp):
    assert out.dtype == torch.float32 and out.shape == exp.shape
    out, exp = out.cpu().double(), exp.double()
    assert torch.equal(torch.isnan(out), torch.isnan(exp)), "NaN in different places"
    fin = ~torch.isnan(exp)
    scale = exp[fin].abs().max().item() if fin.any() else 0.0
    tol = GROUP_ADV_RTOL * exp[fin].abs() + GROUP_ADV_ATOL_FRAC * scale
    err = (out[fin] - exp[fin]).abs()
    assert (err <= tol).all(), "max error %.3g (scale %.3g)" % (err.max().item(), scale)


def ragged_ids(gen, B, offset=10 ** 12):
    """Unsorted, non-contiguous int64 ids: groups of sizes 1..7 (singletons included), ids far
    apart and one negative, members shuffled over the batch."""
    sizes, total = [], 0
    while total < B:
        s = min(int(torch.randint(1, 8, (1,), generator=gen)), B - total)
        sizes.append(s)
        total += s
    values = [offset + 7919 * k for k in range(len(sizes))]
    values[len(values) // 2] = -5
    ids = torch.tensor([values[k] for k, s in enumerate(sizes) for _ in range(s)], dtype=torch.int64)
    return ids[torch.randperm(B, generator=gen)]


def call(device, backend, r, group_index=None, **kw):
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    if "mask" in kw:
        kw["mask"] = dev(kw["mask"])
    return rk.group_advantages(dev(r), dev(group_index), backend=backend, **kw)


def check_masked(out, mask, adv):
    a, tok = out
    assert tok.dtype == torch.float32 and tok.shape == mask.shape
    assert torch.equal(a.cpu(), adv.cpu())
    want = torch.where(mask, adv.cpu()[:, None], torch.zeros(()))
    assert torch.equal(tok.cpu().nan_to_num(7.0), want.nan_to_num(7.0))


# ---- the reference itself ----

def loop_oracle(rewards, groups, mode, eps):
    """One group at a time with Python floats: the modes' definitions (ops/group_advantages.py), read literally."""
    r = rewards.tolist()
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    adv, xs = [0.0] * len(r), {}
    for idx in members.values():
        vals = [r[i] for i in idx]
        n, mean = len(vals), statistics.fmean(vals)
        if n < 2:
            continue
        std = statistics.stdev(vals)
        for i in idx:
            if mode == "grpo":
                adv[i] = (r[i] - mean) / (std + eps)
            elif mode == "rloo":
                adv[i] = r[i] - statistics.fmean([r[j] for j in idx if j != i])
            else:
                adv[i] = r[i] - mean
                xs[i] = adv[i]
    if mode == "reinforce++" and xs:
        m, s = statistics.fmean(xs.values()), statistics.stdev(xs.values())
        for i, x in xs.items():
            adv[i] = (x - m) / (s + eps)
    return torch.tensor(adv, dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_loop_oracle(gen, mode):
    B = 40
    r, ids = rand(gen, B).double(), ragged_ids(gen, B)
    eps = 0.05 if mode in ("grpo", "reinforce++") else 1e-6
    want = loop_oracle(r, ids.tolist(), mode, eps)
    torch.testing.assert_close(ref.group_advantages(r, ids, None, mode, eps), want, rtol=1e-12, atol=1e-12)
    want = loop_oracle(r, [i // 4 for i in range(B)], mode, eps)
    torch.testing.assert_close(ref.group_advantages(r, None, 4, mode, eps), want, rtol=1e-12, atol=1e-12)


# ---- every backend against the reference ----

@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("G,groups", [(1, 5), (2, 3), (3, 7), (7, 4), (16, 37), (37, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_group_size_matches_reference(gen, device, backend, mode, G, groups, masked):
    B = G * groups
    r = rand(gen, B) * 3 + 1
    eps = 0.01 if mode == "grpo" and G == 3 else 1e-6
    want = expected(r, group_size=G, mode=mode, eps=eps)
    if masked:
        m = make_mask(gen, B, 6, 0.6)
        out = call(device, backend, r, group_size=G, mode=mode, eps=eps, mask=m)
        assert_close(out[0], want)
        check_masked(out, m, out[0])
    else:
        assert_close(call(device, backend, r, group_size=G, mode=mode, eps=eps), want)
    if G == 1:
        assert (call(device, backend, r, group_size=G, mode=mode).cpu() == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", [1, 2, 45, 301])
@pytest.mark.parametrize("masked", [False, True])
def test_group_index_matches_reference(gen, device, backend, mode, B, masked):
    r, ids = rand(gen, B) * 2 - 1, ragged_ids(gen, B)
    eps = 0.1 if mode == "reinforce++" else 1e-6
    want = expected(r, ids, mode=mode, eps=eps)
    if masked:
        m = make_mask(gen, B, 3, 0.6)
        out = call(device, backend, r, ids, mode=mode, eps=eps, mask=m)
        assert_close(out[0], want)
        check_masked(out, m, out[0])
    else:
        assert_close(call(device, backend, r, ids, mode=mode, eps=eps), want)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_group_index_dtypes_and_equivalence_with_group_size(gen, device, backend, dtype):
    """Ids of any integer dtype; consecutive ids give what group_size gives."""
    B, G = 24, 4
    r = rand(gen, B)
    consecutive = torch.arange(B) // G
    for mode in MODES:
        a = call(device, backend, r, consecutive.to(dtype), mode=mode)
        assert_close(a, expected(r, group_size=G, mode=mode))
    perm = torch.randperm(B, generator=gen)
    a = call(device, backend, r[perm], (consecutive[perm] * 3).to(dtype), mode="grpo")
    assert_close(a, expected(r, group_size=G, mode="grpo")[perm])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_inputs(device, backend):
    e = torch.empty(0, device=device)
    for kw in (dict(group_size=3), dict(group_index=torch.empty(0, dtype=torch.long, device=device))):
        for mode in MODES:
            a = rk.group_advantages(e, mode=mode, backend=backend, **kw)
            assert a.shape == (0,) and a.dtype == torch.float32
        a, tok = rk.group_advantages(e, mask=torch.ones(0, 5, dtype=torch.bool, device=device), backend=backend, **kw)
        assert a.shape == (0,) and tok.shape == (0, 5)
    r = torch.randn(4, device=device)
    a, tok = rk.group_advantages(r, group_size=2, mask=torch.ones(4, 0, dtype=torch.bool, device=device),
                                 backend=backend)
    assert tok.shape == (4, 0) and a.shape == (4,)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grouping", ["size", "index"])
def test_nan_stays_in_its_group(gen, device, backend, mode, grouping):
    """A NaN (or infinite) reward makes its group's advantages NaN and leaves the other groups
    as if it were not there: reinforce++'s batch statistics skip such groups."""
    G, groups = 4, 6
    B = G * groups
    r = rand(gen, B)
    r[5] = float("nan")        # group 1
    r[3 * G] = float("inf")    # group 3
    if grouping == "size":
        gi, kw = None, dict(group_size=G)
    else:
        gi = (torch.arange(B) // G) * 11 + 3
        perm = torch.randperm(B, generator=gen)
        r, gi = r[perm], gi[perm]
        kw = {}
    groups_of = (torch.arange(B) // G) if gi is None else (gi - 3) // 11
    bad = (groups_of == 1) | (groups_of == 3)
    out = call(device, backend, r, gi, mode=mode, **kw).cpu()
    assert torch.isnan(out[bad]).all()
    assert torch.isfinite(out[~bad]).all()
    clean_ids = groups_of[~bad]
    assert_close(out[~bad], expected(r[~bad], clean_ids, mode=mode))
    # a NaN singleton is NaN, a finite one 0
    one = torch.tensor([float("nan"), 2.0, 1.0, 3.0])
    out = call(device, backend, one, torch.tensor([0, 1, 2, 2]), mode=mode).cpu()
    assert torch.isnan(out[0]) and out[1] == 0 and torch.isfinite(out[2:]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_runs_are_bitwise_identical(gen, device, backend, mode):
    """Large enough on the CPU for several threads and several reinforce++ chunks."""
    # the Triton ragged kernel compares every pair of ids: smaller batches for it
    B = 200 if backend == "triton" and device == "cpu" else 16384 if backend == "triton" else 48 * 4096
    r = rand(gen, B)
    ids = torch.randint(0, B // 5 + 1, (B,), generator=gen) * 977
    for kw in (dict(group_size=16 if B % 16 == 0 else 8), dict(group_index=ids)):
        runs = [call(device, backend, r, mode=mode, **kw) for _ in range(3)]
        for x in runs[1:]:
            assert torch.equal(x, runs[0])
    assert_close(runs[0], expected(r, ids, mode=mode))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs(gen, device, backend):
    B, G = 30, 5
    base = rand(gen, 2 * B)
    r = base[::2]
    ids = ((torch.arange(2 * B) // (2 * G)) * 3)[::2]
    m = make_mask(gen, 7, B, 0.6).t()  # [B, 7], non-contiguous
    assert not r.is_contiguous() and not ids.is_contiguous() and not m.is_contiguous()
    for mode in MODES:
        want = expected(r.contiguous(), group_size=G, mode=mode)
        assert_close(call(device, backend, r, group_size=G, mode=mode), want)
        a, tok = call(device, backend, r, ids, mode=mode, mask=m)
        assert_close(a, want)
        check_masked((a, tok), m, a)
        a, tok = call(device, backend, r, ids, mode=mode, mask=m.long() * 5)  # integer mask, nonzero = valid
        check_masked((a, tok), m, a)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reward_dtypes(gen, device, backend, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter cannot do bf16")
    B, G = 48, 6
    r = rand(gen, B).to(dtype)
    for mode in MODES:
        out = call(device, backend, r, group_size=G, mode=mode)
        # float64 rewards are rounded to float32 first (the kernels read float32)
        assert_close(out, expected(r.float(), group_size=G, mode=mode))


# ---- bad input: the same exception type on every backend, naming the argument ----

R6 = torch.arange(6.0)
BAD = [
    ("group_size not dividing B", dict(rewards=R6, group_size=4), ValueError, "group_size"),
    ("group_size 0", dict(rewards=R6, group_size=0), ValueError, "group_size"),
    ("group_size negative", dict(rewards=R6, group_size=-2), ValueError, "group_size"),
    ("group_size float", dict(rewards=R6, group_size=2.0), TypeError, "group_size"),
    ("group_size bool", dict(rewards=R6, group_size=True), TypeError, "group_size"),
    ("neither grouping", dict(rewards=R6), ValueError, "group_size"),
    ("both groupings", dict(rewards=R6, group_index=torch.zeros(6, dtype=torch.long), group_size=2), ValueError,
     "group_index"),
    ("float group_index", dict(rewards=R6, group_index=torch.zeros(6)), TypeError, "group_index"),
    ("bool group_index", dict(rewards=R6, group_index=torch.zeros(6, dtype=torch.bool)), TypeError, "group_index"),
    ("group_index length", dict(rewards=R6, group_index=torch.zeros(5, dtype=torch.long)), ValueError,
     "group_index"),
    ("2-d group_index", dict(rewards=R6, group_index=torch.zeros(6, 1, dtype=torch.long)), ValueError,
     "group_index"),
    ("group_index list", dict(rewards=R6, group_index=[0] * 6), TypeError, "group_index"),
    ("unknown mode", dict(rewards=R6, group_size=2, mode="ppo"), ValueError, "mode"),
    ("mode not a string", dict(rewards=R6, group_size=2, mode=1), TypeError, "mode"),
    ("2-d rewards", dict(rewards=torch.ones(2, 3), group_size=1), ValueError, "rewards"),
    ("int rewards", dict(rewards=torch.ones(6, dtype=torch.long), group_size=2), TypeError, "rewards"),
    ("rewards list", dict(rewards=[1.0] * 6, group_size=2), TypeError, "rewards"),
    ("mask shape", dict(rewards=R6, group_size=2, mask=torch.ones(5, 4, dtype=torch.bool)), ValueError, "mask"),
    ("1-d mask", dict(rewards=R6, group_size=2, mask=torch.ones(6, dtype=torch.bool)), ValueError, "mask"),
    ("float mask", dict(rewards=R6, group_size=2, mask=torch.ones(6, 4)), TypeError, "mask"),
    ("eps with rloo", dict(rewards=R6, group_size=2, mode="rloo", eps=1e-3), ValueError, "eps"),
    ("eps with dr_grpo", dict(rewards=R6, group_size=2, mode="dr_grpo", eps=0.0), ValueError, "eps"),
    ("negative eps", dict(rewards=R6, group_size=2, eps=-1.0), ValueError, "eps"),
    ("nan eps", dict(rewards=R6, group_size=2, eps=float("nan")), ValueError, "eps"),
    ("inf eps", dict(rewards=R6, group_size=2, eps=float("inf")), ValueError, "eps"),
    ("eps string", dict(rewards=R6, group_size=2, eps="0.1"), TypeError, "eps"),
]


@pytest.mark.parametrize("backend", _backend.available("cpu"))
@pytest.mark.parametrize("name,kwargs,kind,words", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(backend, name, kwargs, kind, words):
    with pytest.raises(kind) as info:
        rk.group_advantages(**kwargs, backend=backend)
    assert words in str(info.value), str(info.value)
    assert not isinstance(info.value, rk.BackendUnavailable)


def test_eps_default_is_the_native_default(gen):
    """The Python default of eps is the C++ kDefaultGroupEps: every mode takes it when eps is left
    out (rloo and dr_grpo refuse any other value), and grpo's result is the reference's with that
    eps, on rewards whose group std (about 1e-6) is of the order of eps, so another default shows."""
    from rlhf_kernels.ops.group_advantages import DEFAULT_EPS
    header = (pathlib.Path(__file__).resolve().parents[1] / "csrc/include/rlhf/group_advantages_op.h").read_text()
    native = float(re.search(r"constexpr double kDefaultGroupEps = ([0-9.eE+-]+);", header).group(1))
    assert DEFAULT_EPS == native
    r = 1e-6 * rand(gen, 8)
    for backend in _backend.available("cpu"):
        for mode in MODES:
            assert_close(rk.group_advantages(r, group_size=4, mode=mode, backend=backend),
                         expected(r, group_size=4, mode=mode, eps=native))
# ---- the registered ops: opcheck and torch.compile ----

@pytest.mark.parametrize("device", native_devices())
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(gen, device, mode):
    B = 24
    r, ids, m = rand(gen, B).to(device), ragged_ids(gen, B).to(device), make_mask(gen, B, 6, 0.6, device=device)
    ops = torch.ops.rlhf_kernels
    eps = 1e-6
    torch.library.opcheck(ops.group_advantages.default, (r, None, 4, mode, eps))
    torch.library.opcheck(ops.group_advantages.default, (r, ids, None, mode, eps))
    torch.library.opcheck(ops.group_advantages_masked.default, (r, None, 3, mode, eps, m))
    torch.library.opcheck(ops.group_advantages_masked.default, (r.double(), ids.int(), None, mode, eps, m.int()))


@pytest.mark.parametrize("device,backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(gen, device, backend):
    B = 24
    r, ids, m = rand(gen, B).to(device), ragged_ids(gen, B).to(device), make_mask(gen, B, 6, 0.6, device=device)

    def step(r, ids, m):
        a = rk.group_advantages(r, group_size=4, mode="grpo", backend=backend)
        b, tok = rk.group_advantages(r, ids, mode="reinforce++", eps=0.01, mask=m, backend=backend)
        c = rk.group_advantages(r * 2, ids, mode="rloo", backend=backend)
        return a, b, tok, c

    step(r, ids, m)  # eager first: the backend's modules and ops are loaded
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(r, ids, m), step(r, ids, m)):
        assert torch.equal(got, want)


# ---- CUDA kernels (csrc/cuda/group_advantages.cu), called through the public op on the cuda
# backend and through torch.ops; inputs made on the GPU. Paths: B <= 4096 with group_index sorts
# in one block; larger B sorts with torch first; groups longer than a part (4096 positions) are
# reduced by the block that owns their start; reinforce++ and the mask on several blocks use a
# cooperative launch.

needs_native_cuda = needs_native_cuda_op("group_advantages")
CUDA_PART = 4096  # positions per part (block) of the CUDA kernel


def _cuda_gen(gen):
    return torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))


def _cuda_cases(gen):
    """(name, rewards, group_index or None, group_size or None), made on the GPU."""
    g = _cuda_gen(gen)
    B = 65536
    r = torch.randn(B, generator=g, device="cuda") * 2 + 0.5
    ragged = torch.randint(0, B // 12, (B,), generator=g, device="cuda") * 1000003 - 7  # sizes ~12, singletons
    long_group = torch.where(torch.rand(B, generator=g, device="cuda") < 0.2,
                             torch.full((B,), 10 ** 15, device="cuda"), ragged)  # one group of ~13000
    small = torch.randint(-50, 50, (3000,), generator=g, device="cuda")
    return [
        ("size16", r, None, 16),
        ("size3", r[: 3 * 21845], None, 3),
        ("size8192", r, None, 8192),          # groups spanning two parts
        ("size_all", r[:20000], None, 20000),  # one group over five parts
        ("ragged", r, ragged, None),
        ("ragged_long", r, long_group, None),
        ("ragged_one_block", r[:3000], small, None),
        ("ragged_4096", r[:CUDA_PART], ragged[:CUDA_PART], None),
        ("ragged_4097", r[:CUDA_PART + 1], ragged[:CUDA_PART + 1], None),
    ]


@pytest.mark.cuda
@needs_native_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_large_batches(gen, mode):
    for name, r, gi, gs in _cuda_cases(gen):
        want = expected(r, gi, gs, mode)
        for backend in ("cuda", "triton") if r.numel() <= 20000 or gi is None else ("cuda",):
            if backend not in rk.available_backends("cuda"):
                continue
            out = rk.group_advantages(r, gi, group_size=gs, mode=mode, backend=backend)
            assert_close(out, want)
            runs = [rk.group_advantages(r, gi, group_size=gs, mode=mode, backend=backend) for _ in range(3)]
            assert all(torch.equal(x, out) for x in runs), (name, backend)


@pytest.mark.cuda
@needs_native_cuda
@pytest.mark.parametrize("mode", ["grpo", "reinforce++"])
@pytest.mark.parametrize("T", [1, 7, 1024])
def test_cuda_masked(gen, mode, T):
    g = _cuda_gen(gen)
    for B, grouping in [(64, dict(group_size=8)), (4096, dict(group_size=16)), (20000, dict(group_size=16)),
                        (5000, dict(group_index=torch.randint(0, 400, (5000,), generator=g, device="cuda")))]:
        r = torch.randn(B, generator=g, device="cuda")
        m = torch.rand(B, T, generator=g, device="cuda") < 0.7
        m[1] = False
        a, tok = rk.group_advantages(r, mode=mode, mask=m, backend="cuda", **grouping)
        assert_close(a, expected(r, grouping.get("group_index"), grouping.get("group_size"), mode))
        assert torch.equal(tok, torch.where(m, a[:, None], torch.zeros((), device="cuda")))


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_nan_confined_across_parts(gen):
    g = _cuda_gen(gen)
    B = 3 * CUDA_PART
    r = torch.randn(B, generator=g, device="cuda")
    ids = torch.arange(B, device="cuda") // 5000  # groups of 5000 across part boundaries
    r[4100] = float("nan")                          # group 0, whose start is in part 0
    for mode in MODES:
        for gi, gs in [(ids, None), (None, B // 2)]:  # groups of 6144: each spans a part boundary
            out = rk.group_advantages(r, gi, group_size=gs, mode=mode, backend="cuda")
            assert_close(out, expected(r, gi, gs, mode))


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_graph_capture_replays_eager(gen):
    """Every path captured in one CUDA graph, replayed on new rewards copied into the static
    input: bitwise the eager results."""
    g = _cuda_gen(gen)
    B, T = 20000, 64
    ops = torch.ops.rlhf_kernels
    small_ids = torch.randint(0, 300, (3000,), generator=g, device="cuda")
    ids = torch.randint(0, 2000, (B,), generator=g, device="cuda")
    m = torch.rand(B, T, generator=g, device="cuda") < 0.7

    def step(r):
        return (ops.group_advantages(r, None, 16, "grpo", 1e-6),
                ops.group_advantages(r, None, 16, "reinforce++", 1e-6),
                ops.group_advantages(r[:3000], small_ids, None, "rloo", 1e-6),
                ops.group_advantages(r, ids, None, "reinforce++", 1e-6),
                *ops.group_advantages_masked(r, None, 8, "grpo", 1e-6, m))

    static = torch.randn(B, generator=g, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static)
    for _ in range(2):
        fresh = torch.randn(B, generator=g, device="cuda")
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        for o, e in zip(outs, step(fresh)):
            assert torch.equal(o, e)


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_no_host_sync(gen):
    g = _cuda_gen(gen)
    r = torch.randn(20000, generator=g, device="cuda")
    ids = torch.randint(0, 2000, (20000,), generator=g, device="cuda")
    m = torch.rand(20000, 16, generator=g, device="cuda") < 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in MODES:
            rk.group_advantages(r, group_size=16, mode=mode, backend="cuda")
            rk.group_advantages(r[:4000], ids[:4000], mode=mode, backend="cuda")
            rk.group_advantages(r, ids, mode=mode, mask=m, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
