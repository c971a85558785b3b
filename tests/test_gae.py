"""GAE, packed GAE and masked whitening: every available backend against the float64
reference, plus independent oracles for the masking semantics and long carries."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.reference import gae as ref
from tests.conftest import device_backends, native_devices, replay_twice
from tests._helpers import make_mask, needs_native_cuda_op
from rlhf_kernels.tolerances import GAE_ATOL, GAE_RTOL

BACKENDS = device_backends()


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).float()


def assert_close_scaled(out, expected, rtol=GAE_RTOL, atol=GAE_ATOL):
    """|out - expected| <= atol + rtol * max|expected| (relative to the tensor's scale)."""
    assert out.dtype == torch.float32
    out, expected = out.double().cpu(), expected.double().cpu()
    assert torch.isfinite(out).all() == torch.isfinite(expected).all()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(out, expected, rtol=0, atol=atol + rtol * scale)


def plain_gae(rewards, values, gamma, lam, last_value=0.0):
    """Textbook GAE over one unmasked sequence, with Python floats (float64)."""
    n = len(rewards)
    adv = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else last_value
        running = rewards[t] + gamma * next_v - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def compacted_gae(r, v, m, gamma, lam, last_value):
    """Masked steps are skipped: GAE on the unmasked steps alone, scattered back."""
    idx = [t for t in range(len(m)) if m[t]]
    a = plain_gae([r[t] for t in idx], [v[t] for t in idx], gamma, lam, last_value)
    adv = [0.0] * len(m)
    for k, t in enumerate(idx):
        adv[t] = a[k]
    return adv


# (B, T): T = 1, B = 1, odd sizes, and T > 64 (the interpreter's Triton tile) so the
# carry between tiles is exercised; 1100 > one CUDA/Triton GPU tile as well
SHAPES = [(1, 1), (1, 9), (3, 1), (4, 37), (5, 200), (2, 1100)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("B,T", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.0, 0.5)])
@pytest.mark.parametrize("with_last", [False, True])
def test_gae_matches_reference(gen, device, backend, B, T, gamma, lam, with_last):
    if backend == "triton" and device == "cpu" and T > 300 and not with_last:
        pytest.skip("interpreter: one long case per shape is enough")
    r, v, m = rand(gen, B, T), rand(gen, B, T), make_mask(gen, B, T, padding="prefix")
    lv = rand(gen, B) if with_last else None
    adv, ret = rk.gae(r.to(device), v.to(device), m.to(device), gamma=gamma, lam=lam,
                      last_values=None if lv is None else lv.to(device), backend=backend)
    ea, er = ref.gae(r.double(), v.double(), m, gamma, lam, None if lv is None else lv.double())
    assert_close_scaled(adv, ea)
    assert_close_scaled(ret, er)
    assert (adv.cpu()[~m] == 0).all() and (ret.cpu()[~m] == 0).all()


def test_reference_semantics_against_independent_oracle(gen):
    """The reference itself: masked steps are skipped (not resets); right padding equals
    the textbook loop over the valid prefix, as in TRL/OpenRLHF."""
    B, T, gamma, lam = 6, 23, 0.97, 0.9
    r, v, m, lv = rand(gen, B, T), rand(gen, B, T), make_mask(gen, B, T, padding="prefix"), rand(gen, B)
    adv, _ = ref.gae(r.double(), v.double(), m, gamma, lam, lv.double())
    for b in range(B):
        expected = compacted_gae(r[b].tolist(), v[b].tolist(), m[b].tolist(), gamma, lam, lv[b].item())
        torch.testing.assert_close(adv[b], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # right padding only: the valid prefix gives the textbook answer with V after it = 0
    n = int(m[2].sum())
    expected = plain_gae(r[2, :n].tolist(), v[2, :n].tolist(), gamma, lam, 0.0)
    adv0, _ = ref.gae(r.double(), v.double(), m, gamma, lam, None)
    torch.testing.assert_close(adv0[2, :n], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_long_sequence_gamma_lam_one(gen, device, backend):
    """gamma*lam = 1 over T = 131072: within 1e-6 (relative to the row's scale) of float64.

    Oracle: with gamma = lam = 1 the advantage is a reverse cumulative sum of TD errors
    over the unmasked steps, computed here in float64 independently of the reference.
    """
    T = 131072 if not (backend == "triton" and device == "cpu") else 4096  # interpreter is slow
    r, v = rand(gen, 1, T), rand(gen, 1, T)
    m = torch.rand(1, T, generator=gen) < 0.9
    lv = rand(gen, 1)
    idx = torch.nonzero(m[0]).flatten()
    rv, vv = r[0, idx].double(), v[0, idx].double()
    next_v = torch.cat([vv[1:], lv.double()])
    delta = rv + next_v - vv
    expected = torch.zeros(1, T, dtype=torch.float64)
    expected[0, idx] = torch.flip(torch.cumsum(torch.flip(delta, [0]), 0), [0])
    adv, ret = rk.gae(r.to(device), v.to(device), m.to(device), gamma=1.0, lam=1.0,
                      last_values=lv.to(device), backend=backend)
    err = (adv.cpu().double() - expected).abs().max() / expected.abs().max()
    assert err <= 1e-6, "relative error %.3g over T=%d" % (err, T)
    ret_expected = torch.where(m, expected + v.double(), torch.zeros_like(expected))
    err_ret = (ret.cpu().double() - ret_expected).abs().max() / ret_expected.abs().max()
    assert err_ret <= 1e-6


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_packed_equals_padded(gen, device, backend, with_mask):
    lengths = [5, 0, 1, 130, 17, 70]
    B, T, gamma, lam = len(lengths), max(lengths), 0.99, 0.95
    r, v, lv = rand(gen, B, T), rand(gen, B, T), rand(gen, B)
    pad_mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    inner = torch.rand(B, T, generator=gen) < 0.8 if with_mask else torch.ones(B, T, dtype=torch.bool)
    m = pad_mask & inner
    cu = torch.tensor([0] + lengths).cumsum(0)
    pr, pv, pm = r[pad_mask], v[pad_mask], inner[pad_mask]
    dev = lambda t: t.to(device)  # noqa: E731
    a, R = rk.gae_packed(dev(pr), dev(pv), dev(cu.int()), gamma=gamma, lam=lam, last_values=dev(lv),
                         mask=dev(pm) if with_mask else None, backend=backend)
    ea, er = ref.gae(r.double(), v.double(), m, gamma, lam, lv.double())
    assert_close_scaled(a, ea[pad_mask])
    assert_close_scaled(R, er[pad_mask])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_and_dtypes(gen, device, backend):
    B, T = 4, 50
    base_r, base_v = rand(gen, T, B), rand(gen, T, B)
    m = make_mask(gen, B, T, padding="prefix")
    r, v = base_r.t(), base_v.t()          # non-contiguous views
    mf = m.t().contiguous().t().long() * 3  # an integer mask (nonzero = valid), also non-contiguous
    assert not r.is_contiguous() and not mf.is_contiguous()
    adv, ret = rk.gae(r.to(device), v.to(device), mf.to(device), gamma=0.99, lam=0.95, backend=backend)
    ea, er = ref.gae(r.double(), v.double(), m, 0.99, 0.95)
    assert_close_scaled(adv, ea)
    assert_close_scaled(ret, er)
    # low-precision inputs are upcast: float32 output equal to running on the upcast values
    for dt in (torch.float16, torch.bfloat16):
        rl, vl = r.to(dt), v.to(dt)
        adv, _ = rk.gae(rl.to(device), vl.to(device), m.to(device), gamma=0.99, lam=0.95, backend=backend)
        ea, _ = ref.gae(rl.double(), vl.double(), m, 0.99, 0.95)
        assert_close_scaled(adv, ea)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_inputs(device, backend):
    for B, T in [(0, 5), (3, 0)]:
        z = torch.empty(B, T, device=device)
        a, R = rk.gae(z, z, torch.ones(B, T, dtype=torch.bool, device=device), backend=backend)
        assert a.shape == (B, T) and R.shape == (B, T) and a.dtype == torch.float32
    e = torch.empty(0, device=device)
    a, R = rk.gae_packed(e, e, torch.zeros(1, dtype=torch.long, device=device), backend=backend)
    assert a.shape == (0,)
    a, R = rk.gae_packed(e, e, torch.zeros(3, dtype=torch.long, device=device), backend=backend)
    assert a.shape == (0,)
    w = rk.masked_whiten(e, e.bool(), backend=backend)
    assert w.shape == (0,)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_stays_in_its_row_and_runs_are_deterministic(gen, device, backend):
    B, T = 3, 40
    r, v, m = rand(gen, B, T), rand(gen, B, T), torch.ones(B, T, dtype=torch.bool)
    r[0, 7] = float("nan")
    v[2, 3] = float("inf")
    a1, R1 = rk.gae(r.to(device), v.to(device), m.to(device), backend=backend)
    a2, R2 = rk.gae(r.to(device), v.to(device), m.to(device), backend=backend)
    assert torch.equal(a1.nan_to_num(7.0), a2.nan_to_num(7.0)) and torch.equal(R1.nan_to_num(7.0), R2.nan_to_num(7.0))
    a1 = a1.cpu()
    assert torch.isfinite(a1[1]).all()
    assert torch.isnan(a1[0, :8]).all() and torch.isfinite(a1[0, 8:]).all()
    ea, _ = ref.gae(r[1:2].double(), v[1:2].double(), m[1:2], 1.0, 0.95)
    assert_close_scaled(a1[1:2], ea)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 5000)])
def test_masked_whiten(gen, device, backend, shift_mean, unbiased, shape):
    x = rand(gen, *shape) * 3 + 2
    m = torch.rand(*shape, generator=gen) < 0.6
    m.view(-1)[0] = True
    out = rk.masked_whiten(x.to(device), m.to(device), shift_mean=shift_mean, unbiased=unbiased, backend=backend)
    exp = ref.masked_whiten(x.double(), m, shift_mean, unbiased, 1e-8)
    assert_close_scaled(out, exp)
    if m.sum() > 2:
        w = out.cpu().double()[m]
        target_mean = 0.0 if shift_mean else x.double()[m].mean().item()
        assert abs(w.mean().item() - target_mean) < 1e-5 * max(1.0, abs(target_mean))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_whiten_degenerate(gen, device, backend):
    x = rand(gen, 10)
    none = torch.zeros(10, dtype=torch.bool)
    assert (rk.masked_whiten(x.to(device), none.to(device), backend=backend) == 0).all()
    one = torch.zeros(10, dtype=torch.bool)
    one[4] = True
    out = rk.masked_whiten(x.to(device), one.to(device), backend=backend)
    assert torch.isfinite(out).all() and (out == 0).all()
    out = rk.masked_whiten(x.to(device), one.to(device), shift_mean=False, backend=backend).cpu()
    assert out[4].item() == pytest.approx(x[4].item(), rel=1e-6)


M23 = torch.ones(2, 3, dtype=torch.bool)
BAD = [
    ("mismatched shapes", lambda: rk.gae(torch.zeros(2, 3) + 1, torch.ones(2, 4), M23), "shape"),
    ("1-D rewards", lambda: rk.gae(torch.ones(3), torch.ones(3), M23[0]), "rewards"),
    ("int rewards", lambda: rk.gae(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), M23), "floating"),
    ("float mask", lambda: rk.gae(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3)), "bool or integer"),
    ("gamma above 1", lambda: rk.gae(torch.ones(2, 3), torch.ones(2, 3), M23, gamma=1.5), "`gamma` must be in"),
    ("NaN lam", lambda: rk.gae(torch.ones(2, 3), torch.ones(2, 3), M23, lam=float("nan")), "`lam` must be in"),
    ("last_values shape", lambda: rk.gae(torch.ones(2, 3), torch.ones(2, 3), M23,
                                         last_values=torch.ones(3)), "last_values"),
    ("float cu_seqlens", lambda: rk.gae_packed(torch.ones(4), torch.ones(4), torch.tensor([0.0, 2.0, 4.0])),
     "cu_seqlens"),
    ("decreasing cu_seqlens", lambda: rk.gae_packed(torch.ones(4), torch.ones(4), torch.tensor([0, 3, 2, 4])),
     "non-decreasing"),
    ("cu_seqlens not ending at N", lambda: rk.gae_packed(torch.ones(4), torch.ones(4), torch.tensor([0, 2, 3])),
     "end at N"),
    ("2-D cu_seqlens", lambda: rk.gae_packed(torch.ones(4), torch.ones(4), torch.tensor([[0, 4]])), "cu_seqlens"),
    ("packed last_values", lambda: rk.gae_packed(torch.ones(4), torch.ones(4), torch.tensor([0, 1, 4]),
                                                 last_values=torch.ones(3)), "last_values"),
    ("whiten shapes", lambda: rk.masked_whiten(torch.ones(3, 2), torch.ones(2, 3, dtype=torch.bool)), "shape"),
    # the native ops see mixed devices only between CPU and CUDA tensors (meta ones go to the fake kernel)
    ("devices", lambda: rk.gae(torch.ones(2, 3), torch.ones(2, 3, device="meta"), M23, backend="torch"), "device"),
    ("not a tensor", lambda: rk.gae([[1.0]], torch.ones(1, 1), M23[:1, :1]), "torch.Tensor"),
    ("mask not a tensor", lambda: rk.gae(torch.ones(1, 1), torch.ones(1, 1), [[True]]), "mask"),
]


@pytest.mark.parametrize("name,call,words", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(name, call, words):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert words in str(info.value)


def test_native_ops_check_their_arguments():
    """The registered ops are callable directly too: they refuse what they cannot serve, and
    take any float dtype, strides and integer masks."""
    if "cpu" not in rk.available_backends("cpu"):
        pytest.skip("native extension not built")
    ops = torch.ops.rlhf_kernels
    r = torch.randn(3, 2)
    adv, _ = ops.gae(r.t(), torch.ones(2, 3).double(), torch.ones(2, 3, dtype=torch.int8), None, 1.0, 0.9)
    ref_adv, _ = ops.gae(r.t().contiguous(), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), None, 1.0, 0.9)
    assert torch.equal(adv, ref_adv)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.gae_packed(torch.ones(4), torch.ones(4), torch.tensor([0, 3, 2, 4]), None, None, 1.0, 0.9)
    with pytest.raises(TypeError, match="bool or integer"):
        ops.masked_whiten(torch.ones(3), torch.ones(3), True, True, 1e-8)
    with pytest.raises(ValueError, match="`gamma` must be in"):
        ops.gae(r, r, r > 0, None, -0.1, 0.9)


@pytest.mark.parametrize("device", native_devices())
def test_opcheck(gen, device):
    B, T = 3, 17
    r, v, m, lv = rand(gen, B, T), rand(gen, B, T), make_mask(gen, B, T, padding="prefix"), rand(gen, B)
    d = lambda t: t.to(device)  # noqa: E731
    ops = torch.ops.rlhf_kernels
    torch.library.opcheck(ops.gae.default, (d(r), d(v), d(m), d(lv), 0.99, 0.95))
    torch.library.opcheck(ops.gae.default, (d(r), d(v), d(m), None, 1.0, 1.0))
    cu = torch.tensor([0, 5, 5, 20, B * T])
    torch.library.opcheck(ops.gae_packed.default, (d(r.flatten()), d(v.flatten()), d(cu), d(rand(gen, 4)),
                                                    d(m.flatten()), 0.99, 0.95))
    torch.library.opcheck(ops.gae_packed.default, (d(r.flatten()), d(v.flatten()), d(cu), None, None, 0.9, 0.9))
    torch.library.opcheck(ops.masked_whiten.default, (d(r), d(m), True, True, 1e-8))


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "torch"])
def test_torch_compile_fullgraph(gen, device, backend):
    B, T = 4, 33
    r, v = rand(gen, B, T).to(device), rand(gen, B, T).to(device)
    m = make_mask(gen, B, T, padding="prefix", device=device)
    cu = torch.tensor([0, 40, 40, B * T], device=device)

    def step(r, v, m):
        adv, ret = rk.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
        pa, _ = rk.gae_packed(r.reshape(-1), v.reshape(-1), cu, gamma=0.9, lam=1.0, backend=backend)
        return rk.masked_whiten(adv, m, backend=backend), ret, pa

    step(r, v, m)  # eager first: the backend's modules and ops are loaded
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(r, v, m), step(r, v, m)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- CUDA kernels (csrc/cuda/gae.cu): one GAE kernel over tiles of 2048 steps with a look-back
# between tiles, one cooperative whitening kernel. Called through torch.ops.rlhf_kernels (the
# native CUDA ops themselves); inputs are made on the GPU.

CUDA_TILE = 2048  # steps per tile (block) of the CUDA GAE kernel


needs_native_cuda = needs_native_cuda_op("gae")


def _cuda_gen(gen):
    """A CUDA generator seeded from the test's own generator."""
    return torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))


def _oracle_row(r, v, m, gamma, lam, last_value):
    """Float64 GAE of one row by the masking rule of the reference (masked steps skipped, V_next =
    value of the next unmasked step or last_value), as a scalar loop over the unmasked steps:
    fast enough for rows of 200k steps. Anchored to ref.gae by test_cuda_oracle_matches_reference."""
    idx = torch.nonzero(m.cpu()).flatten()
    rv, vv = r.cpu().double()[idx], v.cpu().double()[idx]
    next_v = torch.cat([vv[1:], torch.tensor([float(last_value)], dtype=torch.float64)])
    delta = (rv + gamma * next_v - vv).tolist()
    out, running, gl = [0.0] * len(delta), 0.0, gamma * lam
    for i in range(len(delta) - 1, -1, -1):
        running = delta[i] + gl * running
        out[i] = running
    adv = torch.zeros(len(m), dtype=torch.float64)
    adv[idx] = torch.tensor(out, dtype=torch.float64)
    ret = torch.where(m.cpu(), adv + v.cpu().double(), torch.zeros_like(adv))
    return adv, ret


def test_cuda_oracle_matches_reference(gen):
    B, T = 4, 61
    r, v, m, lv = rand(gen, B, T), rand(gen, B, T), make_mask(gen, B, T, padding="prefix"), rand(gen, B)
    ea, er = ref.gae(r.double(), v.double(), m, 0.97, 0.9, lv.double())
    for b in range(B):
        a, R = _oracle_row(r[b], v[b], m[b], 0.97, 0.9, lv[b].item())
        torch.testing.assert_close(a, ea[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(R, er[b], rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@needs_native_cuda
@pytest.mark.parametrize("B,T", [(16, 32768), (3, 200003)])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0)])
@pytest.mark.usefixtures("poison_empty")
def test_cuda_gae_long_rows(gen, B, T, gamma, lam):
    """Rows of many tiles, with fully masked tiles, a fully masked row, masked stretches across
    tile boundaries and a row masked from the middle on (right padding)."""
    g = _cuda_gen(gen)
    r, v, lv = (torch.randn(B, T, generator=g, device="cuda"), torch.randn(B, T, generator=g, device="cuda"),
                torch.randn(B, generator=g, device="cuda"))
    m = torch.rand(B, T, generator=g, device="cuda") < 0.85
    flat = m.view(-1)
    flat[CUDA_TILE:2 * CUDA_TILE] = False                    # a whole tile (tiles are aligned to 2048 steps)
    flat[5 * CUDA_TILE - 100:7 * CUDA_TILE + 100] = False    # two tiles and their neighbours' ends
    m[1] = False                                             # a fully masked row
    m[2, T // 2:] = False                                    # right padding
    adv, ret = torch.ops.rlhf_kernels.gae(r, v, m, lv, gamma, lam)
    for b in range(B):
        ea, er = _oracle_row(r[b], v[b], m[b], gamma, lam, lv[b].item())
        assert_close_scaled(adv[b], ea)
        assert_close_scaled(ret[b], er)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


def _packed_case(gen, lengths, with_mask, with_last):
    g = _cuda_gen(gen)
    N = sum(lengths)
    r, v = torch.randn(N, generator=g, device="cuda"), torch.randn(N, generator=g, device="cuda")
    m = torch.rand(N, generator=g, device="cuda") < 0.8 if with_mask else None
    lv = torch.randn(len(lengths), generator=g, device="cuda") if with_last else None
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    return r, v, m, lv, cu


@pytest.mark.cuda
@needs_native_cuda
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_last", [False, True])
@pytest.mark.parametrize("order", ["as_listed", "shuffled"])
def test_cuda_gae_packed_ragged(gen, with_mask, with_last, order):
    C = CUDA_TILE
    lengths = [0, 1, C - 1, C, C + 1, 5 * C + 3, 0, 7, 3 * C]
    if order == "shuffled":
        lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=gen).tolist()]
    r, v, m, lv, cu = _packed_case(gen, lengths, with_mask, with_last)
    adv, ret = torch.ops.rlhf_kernels.gae_packed(r, v, cu, lv, m, 0.99, 0.95)
    bounds = cu.tolist()
    for b in range(len(lengths)):
        s, e = bounds[b], bounds[b + 1]
        mb = m[s:e] if m is not None else torch.ones(e - s, dtype=torch.bool, device="cuda")
        ea, er = _oracle_row(r[s:e], v[s:e], mb, 0.99, 0.95, lv[b].item() if lv is not None else 0.0)
        assert_close_scaled(adv[s:e], ea)
        assert_close_scaled(ret[s:e], er)


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_gae_packed_many_short_rows(gen):
    """More rows than a warp searches in one round, rows of length 0 and 1 inside tiles."""
    lengths = torch.randint(0, 6, (5000,), generator=gen).tolist()
    r, v, m, lv, cu = _packed_case(gen, lengths, True, True)
    adv, ret = torch.ops.rlhf_kernels.gae_packed(r, v, cu, lv, m, 0.99, 0.95)
    ea, er = ref.gae_packed(r.cpu().double(), v.cpu().double(), cu.cpu(), 0.99, 0.95, lv.cpu().double(), m.cpu())
    assert_close_scaled(adv, ea)
    assert_close_scaled(ret, er)


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_runs_are_bitwise_identical(gen):
    """Five runs, the same bits: the look-back applies tile maps one by one in a fixed order,
    whichever predecessor state it happens to find (gamma*lam near 1 so that carries matter)."""
    g = _cuda_gen(gen)
    B, T = 4, 100001
    r, v = torch.randn(B, T, generator=g, device="cuda"), torch.randn(B, T, generator=g, device="cuda")
    m = torch.rand(B, T, generator=g, device="cuda") < 0.9
    lv = torch.randn(B, generator=g, device="cuda")
    cu = torch.tensor([0, 7, 50000, 50000, 250001, B * T], device="cuda")
    ops = torch.ops.rlhf_kernels
    runs = []
    for _ in range(5):
        a, R = ops.gae(r, v, m, lv, 1.0, 0.9999)
        pa, pR = ops.gae_packed(r.view(-1), v.view(-1), cu, lv[:1].repeat(5), m.view(-1), 1.0, 0.9999)
        w = ops.masked_whiten(r, m, True, True, 1e-8)
        runs.append((a, R, pa, pR, w))
    for run in runs[1:]:
        for x, y in zip(run, runs[0]):
            assert torch.equal(x, y)


@pytest.mark.cuda
@needs_native_cuda
@pytest.mark.parametrize("n", [1, 1000, 2**20 + 3])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.usefixtures("poison_empty")
def test_cuda_masked_whiten_sizes(gen, n, shift_mean, unbiased):
    g = _cuda_gen(gen)
    x = torch.randn(n, generator=g, device="cuda") * 3 + 2
    m = torch.rand(n, generator=g, device="cuda") < 0.6
    m[0] = True
    out = torch.ops.rlhf_kernels.masked_whiten(x, m, shift_mean, unbiased, 1e-8)
    exp = ref.masked_whiten(x.cpu().double(), m.cpu(), shift_mean, unbiased, 1e-8)
    assert_close_scaled(out, exp)
    # an unaligned view (the scalar load path) gives the same statistics
    if n > 8:
        out1 = torch.ops.rlhf_kernels.masked_whiten(x[1:], m[1:], shift_mean, unbiased, 1e-8)
        assert_close_scaled(out1, ref.masked_whiten(x[1:].cpu().double(), m[1:].cpu(), shift_mean, unbiased, 1e-8))


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_graph_capture_replays_eager(gen):
    """gae, gae_packed and masked_whiten (a cooperative launch) captured in one CUDA graph, then
    replayed on new values copied into the static inputs: bitwise the eager results."""
    g = _cuda_gen(gen)
    B, T = 8, 5000
    ops = torch.ops.rlhf_kernels
    cu = torch.tensor([0, 1, 4097, 4097, 20000, B * T], device="cuda")

    def make():
        return (torch.randn(B, T, generator=g, device="cuda"), torch.randn(B, T, generator=g, device="cuda"),
                torch.rand(B, T, generator=g, device="cuda") < 0.8, torch.randn(B, generator=g, device="cuda"))

    def step(r, v, m, lv):
        a, R = ops.gae(r, v, m, lv, 0.99, 0.95)
        pa, pR = ops.gae_packed(r.view(-1), v.view(-1), cu, lv[:5], m.view(-1), 0.99, 0.95)
        return a, R, pa, pR, ops.masked_whiten(a, m, True, True, 1e-8)

    # capture after a warm-up on a side stream, replay twice on fresh inputs, bitwise equal to eager
    replay_twice(make, step, check=lambda fresh, outs: None)


@pytest.mark.cuda
@needs_native_cuda
def test_cuda_no_host_sync(gen):
    g = _cuda_gen(gen)
    B, T = 4, 3000
    r, v = torch.randn(B, T, generator=g, device="cuda"), torch.randn(B, T, generator=g, device="cuda")
    m = torch.rand(B, T, generator=g, device="cuda") < 0.8
    lv = torch.randn(B, generator=g, device="cuda")
    cu = torch.tensor([0, 10, 5000, B * T], device="cuda")
    ops = torch.ops.rlhf_kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a, _ = ops.gae(r, v, m, lv, 0.99, 0.95)
        ops.gae_packed(r.view(-1), v.view(-1), cu, lv[:3], None, 0.99, 0.95)
        ops.masked_whiten(a, m, True, True, 1e-8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
