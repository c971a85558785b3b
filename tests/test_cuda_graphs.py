"""On a GPU every op, forward and backward, on the cuda and triton backends, makes no host sync
with valid inputs and can be captured in a CUDA graph that replays to the eager values.

The validations that must read device memory (labels in range, cu_seqlens increasing) sync by
design; they are documented and turned off here with ``validate=False``, as a trainer that
captures graphs would do (capture also skips them by itself).
"""

import pytest
import torch

import rlhf_kernels as rk

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in rk.available_backends("cuda")]


def _inputs(device):
    """Fresh random inputs of every op, made on the device: {name: tensor}."""
    gen = torch.Generator(device=device).manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    B, T, V, H = 6, 300, 257, 64
    x = {
        "r": randn(B, T), "v": randn(B, T), "mask": torch.rand(B, T, generator=gen, device=device) < 0.8,
        "logits": randn(B, 7, V), "ref_logits": randn(B, 7, V),
        "labels": torch.randint(0, V, (B, 7), generator=gen, device=device),
        "hidden": randn(B * 7, H), "weight": randn(V, H) / 8,
        "lp": -2 * torch.rand(B, T, generator=gen, device=device), "adv": randn(B, T),
        "chosen": randn(500), "rejected": randn(500), "rank": randn(40, 5),
        "pred": randn(500), "score": randn(500), "level": torch.randint(0, 5, (500,), generator=gen, device=device),
        "thresh": torch.tensor([-3.0, -1.0, 1.0, 3.0], device=device) + 0.2 * randn(4),
    }
    x["old_lp"] = x["lp"] + 0.2 * randn(B, T)
    x["roll_lp"] = x["old_lp"] + 0.3 * randn(B, T)
    x["labels"][0, 0] = -100
    x["cu"] = torch.tensor([0, 100, 100, 1000, B * T], device=device)
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
