"""On a GPU every op, forward and backward, on the cuda and triton backends, makes no host sync
with valid inputs and can be captured in a CUDA graph that replays to the eager values.

The validations that must read device memory (labels in range, cu_seqlens increasing) sync by
design; they are documented and turned off here with ``validate=False``, as a trainer that
captures graphs would do (capture also skips them by itself).
"""

import pytest
import torch

import rlhf_kernels as rk
from tests.conftest import replay_twice

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in rk.available_backends("cuda")]


def _inputs(device, seed=1234, B=6, T=300, V=257, H=64, pairs=500, ranked=(40, 5), cuts=(100, 1000),
            weight_div=8):
    """Fresh random inputs of every op, made on the device from ``seed``: {name: tensor}. B rows
    of T tokens; logits of B x 7 tokens over V; hidden states of width H; ``pairs`` pairs of
    scores and ``ranked`` rankings for the reward-model losses; packed sequences cut at ``cuts``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    x = {
        "r": randn(B, T), "v": randn(B, T), "mask": torch.rand(B, T, generator=gen, device=device) < 0.8,
        "logits": randn(B, 7, V), "ref_logits": randn(B, 7, V),
        "labels": torch.randint(0, V, (B, 7), generator=gen, device=device),
        "hidden": randn(B * 7, H), "weight": randn(V, H) / weight_div,
        "lp": -2 * torch.rand(B, T, generator=gen, device=device), "adv": randn(B, T),
        "chosen": randn(pairs), "rejected": randn(pairs), "rank": randn(*ranked),
        "pred": randn(pairs), "score": randn(pairs),
        "level": torch.randint(0, 5, (pairs,), generator=gen, device=device),
        "thresh": torch.tensor([-3.0, -1.0, 1.0, 3.0], device=device) + 0.2 * randn(4),
    }
    x["old_lp"] = x["lp"] + 0.2 * randn(B, T)
    x["roll_lp"] = x["old_lp"] + 0.3 * randn(B, T)
    x["labels"][0, 0] = -100
    x["cu"] = torch.tensor([0, cuts[0], cuts[0], cuts[1], B * T], device=device)
    return x


# name -> (function of (inputs, backend) returning a tuple of tensors, names of differentiable inputs)
OPS = {
    "gae": (lambda x, b: rk.gae(x["r"], x["v"], x["mask"], gamma=0.99, lam=0.95, backend=b), ()),
    "gae_packed": (lambda x, b: rk.gae_packed(x["r"].reshape(-1), x["v"].reshape(-1), x["cu"], gamma=0.99,
                                              lam=0.95, validate=False, backend=b), ()),
    "masked_whiten": (lambda x, b: (rk.masked_whiten(x["r"], x["mask"], backend=b),), ()),
    "token_logprobs": (lambda x, b: rk.token_logprobs(x["logits"], x["labels"], return_entropy=True,
                                                      validate=False, backend=b), ("logits",)),
    "token_entropy": (lambda x, b: (rk.token_entropy(x["logits"], temperature=0.7, backend=b),), ("logits",)),
    "full_kl": (lambda x, b: (rk.full_kl(x["logits"], x["ref_logits"], backend=b),), ("logits",)),
    "kl_penalty": (lambda x, b: (rk.kl_penalty(x["lp"], x["old_lp"], "k3", backend=b),), ("lp",)),
    "linear_token_logprobs": (lambda x, b: rk.linear_token_logprobs(x["hidden"], x["weight"], x["labels"].reshape(-1),
                                                                    return_entropy=True, validate=False, backend=b),
                              ("hidden", "weight")),
    "ppo_policy_loss": (lambda x, b: _loss(rk.ppo_policy_loss(x["lp"], x["old_lp"], x["adv"], x["mask"],
                                                              dual_clip=3.0, backend=b)), ("lp",)),
    "ppo_policy_loss_gspo_tis": (lambda x, b: _loss(rk.ppo_policy_loss(
        x["lp"], x["old_lp"], x["adv"], x["mask"], ratio_level="sequence", rollout_logprobs=x["roll_lp"],
        is_correction="tis", is_level="geometric", loss_agg="token-sum", backend=b)), ("lp",)),
    "ppo_policy_loss_cispo_mis": (lambda x, b: _loss(rk.ppo_policy_loss(
        x["lp"], x["old_lp"], x["adv"], x["mask"], objective="cispo", rollout_logprobs=x["roll_lp"],
        is_correction="mis", is_level="sequence", backend=b)), ("lp",)),
    "linear_policy_loss": (lambda x, b: _policy_head(x, b, dual_clip=3.0), ("hidden", "weight")),
    "linear_policy_loss_gspo_mis": (lambda x, b: _policy_head(
        x, b, ratio_level="sequence", rollout_logprobs=x["roll_lp"][:, :7], is_correction="mis",
        is_level="geometric"), ("hidden", "weight")),
    "ppo_value_loss": (lambda x, b: _loss(rk.ppo_value_loss(x["v"], x["r"], x["adv"], x["mask"], backend=b)),
                       ("v",)),
    "bt_loss": (lambda x, b: _loss(rk.bt_loss(x["chosen"], x["rejected"], label_smoothing=0.1, backend=b)),
                ("chosen", "rejected")),
    "ranking_loss": (lambda x, b: _loss(rk.ranking_loss(x["rank"], backend=b)), ("rank",)),
    "score_loss": (lambda x, b: _loss(rk.score_loss(x["pred"], x["score"], backend=b)), ("pred",)),
    "score_loss_ordinal": (lambda x, b: _loss(rk.score_loss(x["pred"], x["level"], kind="ordinal",
                                                            thresholds=x["thresh"], validate=False, backend=b)),
                           ("pred", "thresh")),
}


def _loss(out):
    loss, stats = out
    return (loss, stats.packed)


def _policy_head(x, b, **options):
    """linear_policy_loss on [B, 7] tokens (the hidden states of linear_token_logprobs' case), with
    entropy and KL terms; the label -100 masked out."""
    B = x["labels"].shape[0]
    mask = x["mask"][:, :7] & (x["labels"] >= 0)
    loss, stats = rk.linear_policy_loss(x["hidden"].view(B, 7, -1), x["weight"], x["labels"], x["old_lp"][:, :7],
                                        x["adv"][:, :7], mask, ref_logprobs=x["lp"][:, :7], kl_coef=0.05,
                                        entropy_coef=0.01, validate=False, backend=b, **options)
    return (loss, stats.packed, stats["logprobs"])


def _step(name, x, backend):
    """Outputs and gradients (of the sum of the differentiable outputs) of one call."""
    fn, diff = OPS[name]
    out = fn(x, backend)
    if not diff:
        return tuple(out)
    total = sum(o.sum() for o in out if o.requires_grad)
    grads = torch.autograd.grad(total, [x[k] for k in diff])
    return tuple(out) + tuple(grads)


def _fresh(name, backend):
    x = _inputs("cuda")
    for k in OPS[name][1]:
        x[k] = x[k].detach().requires_grad_()
    return x


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", list(OPS))
def test_no_host_sync(name, backend):
    x = _fresh(name, backend)
    _step(name, x, backend)  # first call: compilation, caches, lazy initialization
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(name, x, backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", list(OPS))
def test_cuda_graph_capture_replays_eager_values(name, backend):
    x = _fresh(name, backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graph expects
        for _ in range(3):
            _step(name, x, backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(name, x, backend)
    new = _inputs("cuda")
    gen = torch.Generator(device="cuda").manual_seed(99)
    with torch.no_grad():  # new values in the captured input buffers
        for k, t in x.items():
            if t.is_floating_point():
                t.copy_(new[k] + 0.1 * torch.randn(t.shape, generator=gen, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    eager = _step(name, x, backend)
    for got, want in zip(static_out, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)


# ---- The audit's F1: a forward's ticket counter is per call. A counter cached per
# (device, stream) was baked into graphs captured on a stream that had run eager calls, so two
# launches could share it when replayed on other streams: each case below overlaps graph
# replays and eager calls on several streams, and checks every result bitwise against the
# eager values computed one call at a time. The work is sized so that the launches overlap.

PPO_CASES = ["ppo_policy_loss", "ppo_policy_loss_gspo_tis", "ppo_value_loss"]


def _ppo_inputs(seed, B=512, T=2048):
    """Fresh inputs of the PPO ops (the keys of _inputs they read), on the GPU, with grads."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn():
        return torch.randn(B, T, generator=gen, device="cuda")

    x = {"lp": -2 * torch.rand(B, T, generator=gen, device="cuda"), "adv": randn(), "v": randn(), "r": randn(),
         "mask": torch.rand(B, T, generator=gen, device="cuda") < 0.8}
    x["old_lp"] = x["lp"] + 0.2 * randn()
    x["roll_lp"] = x["old_lp"] + 0.3 * randn()
    for k in ("lp", "v"):
        x[k] = x[k].detach().requires_grad_()
    return x


def _refill(x, seed):
    """New values in x's buffers (as a captured graph's static inputs get them)."""
    new = _ppo_inputs(seed, *x["lp"].shape)
    with torch.no_grad():
        for k, t in x.items():
            t.copy_(new[k])
    return new


def _eager(name, x, backend):
    """The eager values, one call at a time on the current stream."""
    out = tuple(t.detach().clone() for t in _step(name, x, backend))
    torch.cuda.synchronize()
    return out


def _assert_equal(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), "%s: output %d differs from the eager value" % (what, i)


def _capture(name, x, backend, stream):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = _step(name, x, backend)
    return graph, out


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", PPO_CASES)
def test_graph_captured_on_a_stream_that_ran_eager_calls(name, backend):
    s, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    x, z = _ppo_inputs(1), _ppo_inputs(2)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # eager calls on the capture stream first
            _step(name, x, backend)
            _step(name, z, backend)
        graph, static = _capture(name, x, backend, s)
    torch.cuda.synchronize()
    for round in range(5):
        new = _refill(x, 100 + round)
        want, want_z = _eager(name, new, backend), _eager(name, z, backend)
        s2.wait_stream(torch.cuda.current_stream())
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s2):
            graph.replay()
        with torch.cuda.stream(s):  # an eager call on the capture stream, overlapping the replay
            got_z = _step(name, z, backend)
        torch.cuda.synchronize()
        _assert_equal(static, want, "replay %d" % round)
        _assert_equal(got_z, want_z, "eager call beside replay %d" % round)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", PPO_CASES)
def test_two_graphs_of_one_stream_replayed_on_two_streams(name, backend):
    s, s1, s2 = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
    x1, x2, z = _ppo_inputs(3), _ppo_inputs(4), _ppo_inputs(5)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _step(name, z, backend)
        g1, out1 = _capture(name, x1, backend, s)
        _step(name, z, backend)
        g2, out2 = _capture(name, x2, backend, s)
    torch.cuda.synchronize()
    for round in range(5):
        want1 = _eager(name, _refill(x1, 200 + round), backend)
        want2 = _eager(name, _refill(x2, 300 + round), backend)
        want_z = _eager(name, z, backend)
        for st in (s, s1, s2):
            st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s1):
            g1.replay()
        with torch.cuda.stream(s):
            got_z = _step(name, z, backend)  # eager calls between and beside the replays
        with torch.cuda.stream(s2):
            g2.replay()
        with torch.cuda.stream(s):
            got_z2 = _step(name, z, backend)
        torch.cuda.synchronize()
        _assert_equal(out1, want1, "graph 1, replay %d" % round)
        _assert_equal(out2, want2, "graph 2, replay %d" % round)
        _assert_equal(got_z, want_z, "eager call %d" % round)
        _assert_equal(got_z2, want_z, "second eager call %d" % round)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", PPO_CASES)
def test_compile_reduce_overhead_equals_eager(name, backend):
    """torch.compile(mode="reduce-overhead") records CUDA graphs in a private memory pool;
    several calls with new inputs (the first ones warm up and record), eager calls between."""
    torch._dynamo.reset()
    fn = OPS[name][0]

    def forward(lp, old_lp, roll_lp, adv, v, r, mask):
        x = dict(lp=lp, old_lp=old_lp, roll_lp=roll_lp, adv=adv, v=v, r=r, mask=mask)
        return fn(x, backend)

    compiled = torch.compile(forward, mode="reduce-overhead")
    keys = ("lp", "old_lp", "roll_lp", "adv", "v", "r", "mask")
    with torch.no_grad():
        for i in range(6):
            x = _ppo_inputs(400 + i, B=64, T=1000)
            got = tuple(t.clone() for t in compiled(*(x[k] for k in keys)))  # outputs are reused by the graph
            eager_between = tuple(t.clone() for t in fn(_ppo_inputs(500 + i, B=64, T=1000), backend))
            want = tuple(t.clone() for t in fn(x, backend))
            torch.cuda.synchronize()
            _assert_equal(got, want, "compiled call %d" % i)
            assert all(torch.isfinite(t).all() for t in eager_between)


# ---- Capture at sizes that reach the CUDA kernels' multi-block paths (the cases above
# and the first capture test use one GAE tile and one block): rows of 42 GAE tiles of 2048 steps
# (past the look-back's window of 32 tiles, so it takes more than one round), masked_whiten
# over 21 parts of 8192 and over ~1000 parts (blocks loop over parts when fewer are co-resident),
# group_advantages over 4 parts of 4096 (plain, cooperative, sorted and masked launches). Each
# replay is compared with the eager values (bitwise) and with the float64 reference.

CUDA_GAE_TILE = 2048
LONG_T = 41 * CUDA_GAE_TILE + 77


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_capture_gae_and_whiten_multi_block(backend):
    from rlhf_kernels.reference import gae as ref
    from tests.test_gae import _oracle_row, assert_close_scaled

    g = torch.Generator(device="cuda").manual_seed(7)
    B, T = 2, LONG_T
    cu = torch.tensor([0, 5, 5, 3 * CUDA_GAE_TILE + 1, T + 11, B * T], device="cuda")

    def make():
        r, v = torch.randn(B, T, generator=g, device="cuda"), torch.randn(B, T, generator=g, device="cuda")
        m = torch.rand(B, T, generator=g, device="cuda") < 0.85
        m.view(-1)[4 * CUDA_GAE_TILE:6 * CUDA_GAE_TILE + 9] = False  # two whole tiles masked
        return r, v, m, torch.randn(B, generator=g, device="cuda")

    def step(r, v, m, lv):
        a, R = rk.gae(r, v, m, gamma=0.99, lam=0.95, last_values=lv, backend=backend)
        pa, pR = rk.gae_packed(r.view(-1), v.view(-1), cu, gamma=0.99, lam=0.95, last_values=lv.repeat(3)[:5],
                               mask=m.view(-1), validate=False, backend=backend)
        return a, R, pa, pR, rk.masked_whiten(r, m, backend=backend)

    def check(inputs, outs):
        r, v, m, lv = inputs
        a, R, pa, pR, w = outs
        for b in range(B):
            ea, er = _oracle_row(r[b], v[b], m[b], 0.99, 0.95, lv[b].item())
            assert_close_scaled(a[b], ea)
            assert_close_scaled(R[b], er)
        bounds, plv = cu.tolist(), lv.repeat(3)[:5].tolist()
        for k in range(len(bounds) - 1):
            s, e = bounds[k], bounds[k + 1]
            if e > s:
                ea, er = _oracle_row(r.view(-1)[s:e], v.view(-1)[s:e], m.view(-1)[s:e], 0.99, 0.95, plv[k])
                assert_close_scaled(pa[s:e], ea)
                assert_close_scaled(pR[s:e], er)
        assert_close_scaled(w, ref.masked_whiten(r.cpu().double(), m.cpu()))

    replay_twice(make, step, check)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_capture_masked_whiten_many_parts(backend):
    from rlhf_kernels.reference import gae as ref
    from tests.test_gae import assert_close_scaled

    g = torch.Generator(device="cuda").manual_seed(8)
    n = 12_000_017  # 977 parts of 6 tiles

    def make():
        return (torch.randn(n, generator=g, device="cuda") * 3 + 2, torch.rand(n, generator=g, device="cuda") < 0.6)

    def step(x, m):
        return (rk.masked_whiten(x, m, backend=backend), rk.masked_whiten(x, m, shift_mean=False, backend=backend))

    def check(inputs, outs):
        x, m = (t.cpu() for t in inputs)
        assert_close_scaled(outs[0], ref.masked_whiten(x.double(), m))
        assert_close_scaled(outs[1], ref.masked_whiten(x.double(), m, shift_mean=False))

    replay_twice(make, step, check)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_capture_group_advantages_multi_block(backend):
    from tests.test_group_advantages import assert_close, expected

    g = torch.Generator(device="cuda").manual_seed(9)
    B, T = 3 * 4096 + 124, 16
    ids = torch.randint(0, 3000, (B,), generator=g, device="cuda") * 7919 - 5  # B > 4096: sorted by torch
    mask = torch.rand(B, T, generator=g, device="cuda") < 0.7

    def make():
        return (torch.randn(B, generator=g, device="cuda") * 2 + 0.5,)

    def step(r):
        a, tok = rk.group_advantages(r, group_size=4, mode="reinforce++", mask=mask, backend=backend)
        return (rk.group_advantages(r, group_size=4, mode="grpo", backend=backend),
                rk.group_advantages(r, group_size=4, mode="reinforce++", backend=backend),
                rk.group_advantages(r, ids, mode="rloo", backend=backend), a, tok)

    def check(inputs, outs):
        (r,) = inputs
        grpo, rpp, rloo, a, tok = outs
        assert_close(grpo, expected(r, None, 4, "grpo"))
        assert_close(rpp, expected(r, None, 4, "reinforce++"))
        assert_close(rloo, expected(r, ids, None, "rloo"))
        assert torch.equal(a, rpp)
        assert torch.equal(tok, torch.where(mask, a[:, None], torch.zeros((), device="cuda")))

    replay_twice(make, step, check)
