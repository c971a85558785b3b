"""rlhf_kernels.integrations.trl against the installed TRL: the same outputs and gradients as
TRL's own functions (rule: tests/test_integrations_kit.py), fall-through where we do not
implement an option, and patch() swapping them where TRL looks them up."""

import warnings

import pytest
import torch

from rlhf_kernels import tolerances as tol
from test_integrations_kit import (DEVICES, assert_close, assert_grads_close, assert_matmul_grads_close, grad_of,
                                   logits, mask_with_gaps, require, up)

tu = require("trl.trainer.utils")
chunked = require("trl.kernels.chunked_logprob")
import rlhf_kernels.integrations.trl as rk_trl  # noqa: E402
from rlhf_kernels.integrations import _common  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::rlhf_kernels.integrations.FallThroughWarning")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def labels_like(gen, z):
    return torch.randint(0, z.shape[-1], z.shape[:-1], generator=gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("row_mask", [False, True], ids=["no_mask", "row_mask"])
@pytest.mark.parametrize("device", DEVICES)
def test_selective_log_softmax(gen, dtype, temperature, row_mask, device):
    z = logits(gen, (3, 6, 257), dtype).to(device)
    index = labels_like(gen, z).to(device)
    rm = mask_with_gaps(gen, 3, 6).to(device) if row_mask else None
    g = torch.randn(3, 6, generator=gen).to(device)
    lib, lib_grad = grad_of(lambda x: tu.selective_log_softmax(x, index, temperature, rm), z, grad_out=g)
    ref, ref_grad = grad_of(lambda x: tu.selective_log_softmax(x, index, temperature, rm), up(z), grad_out=g)
    ours, our_grad = grad_of(lambda x: rk_trl.selective_log_softmax(x, index, temperature, rm), z, grad_out=g)
    assert_close(ours, lib, ref, tol.LOGPROB_ATOL)
    assert_grads_close(our_grad, lib_grad, ref_grad)
    if rm is not None:  # skipped rows: exactly 0, and no gradient
        assert torch.all(ours[rm == 0] == 0) and torch.all(our_grad[0][rm == 0] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_entropy_from_logits(gen, dtype, device):
    z = logits(gen, (2, 5, 131), dtype).to(device)
    g = torch.randn(2, 5, generator=gen).to(device)
    lib, lib_grad = grad_of(lambda x: tu.entropy_from_logits(x, chunk_size=3), z, grad_out=g)
    ref, ref_grad = grad_of(tu.entropy_from_logits, up(z), grad_out=g)
    ours, our_grad = grad_of(lambda x: rk_trl.entropy_from_logits(x, chunk_size=3), z, grad_out=g)
    assert_close(ours, lib, ref, tol.LOGPROB_ATOL)
    assert_grads_close(our_grad, lib_grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_selective_log_softmax_and_entropy(gen, dtype, entropy_requires_grad, device):
    z = logits(gen, (4, 3, 97), dtype).to(device)
    index = labels_like(gen, z).to(device)
    rm = mask_with_gaps(gen, 4, 3, torch.bool).to(device)
    g_logp, g_ent = torch.randn(4, 3, generator=gen).to(device), torch.randn(4, 3, generator=gen).to(device)

    def run(fn, x):
        x = x.detach().clone().requires_grad_(True)
        logp, ent = fn(x, index, entropy_requires_grad, 0.9, rm)
        assert ent.requires_grad == entropy_requires_grad
        loss = (logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()
        return logp, ent, torch.autograd.grad(loss, x)[0]

    lib = run(tu.selective_log_softmax_and_entropy, z)
    ref = run(tu.selective_log_softmax_and_entropy, up(z))
    ours = run(rk_trl.selective_log_softmax_and_entropy, z)
    assert_close(ours[0], lib[0], ref[0], tol.LOGPROB_ATOL, what="logp")
    assert_close(ours[1], lib[1], ref[1], tol.LOGPROB_ATOL, what="entropy")
    assert_grads_close([ours[2]], [lib[2]], [ref[2]])
    assert torch.all(ours[1][~rm] == 0)


def float64_head(hidden, weight, bias, targets, temperature):
    """The fused head's math in float64: log softmax and entropy of (h W^T + b) / T."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp_all = torch.log_softmax(z / temperature, -1)
    return logp_all.gather(-1, targets[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_logprob_apply(gen, dtype, bias, outputs, device):
    """GRPOTrainer's fused LM head (add_fused_lm_head -> ChunkedLogProbFunction.apply)."""
    N, H, V, T = 13, 16, 257, 0.8
    h = (torch.randn(N, H, generator=gen)).to(device, dtype)
    w = (torch.randn(V, H, generator=gen) / 2).to(device, dtype)
    b = (torch.randn(V, generator=gen) / 4).to(device, dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    g_logp, g_ent = torch.randn(N, generator=gen).to(device), torch.randn(N, generator=gen).to(device)
    inputs = [h, w] + ([b] if bias else [])

    def run(apply, *xs, chunk=64):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        hh, ww, bb = xs[0], xs[1], xs[2] if bias else None
        if apply is None:
            out = float64_head(hh, ww, bb, y, T)
        else:
            out = apply(hh, ww, bb, y, T, chunk, None, 1.0, outputs)
        logp, ent = out[0], out[1]
        if apply is not None:
            assert out[2:] == (None, None, None) and (ent is None) == ("entropy" not in outputs)
        loss = (logp * g_logp.to(logp.dtype)).sum()
        if "entropy" in outputs:
            loss = loss + (ent * g_ent.to(ent.dtype)).sum()
        return logp, ent, torch.autograd.grad(loss, xs)

    lib = run(chunked.ChunkedLogProbFunction.apply, *inputs)
    ours = run(rk_trl.chunked_logprob_apply, *inputs)
    ref = run(None, *inputs)
    # TRL rounds each bf16 logits tile to bf16 before the softmax; ours accumulates in float32
    assert_close(ours[0], lib[0], ref[0], tol.LOGPROB_ATOL, what="logp")
    if "entropy" in outputs:
        assert_close(ours[1], lib[1], ref[1], tol.LOGPROB_ATOL, what="entropy")
    assert_matmul_grads_close(ours[2], lib[2], ref[2])


def test_chunked_logprob_apply_under_autocast(gen):
    """GRPOTrainer's default: bf16 autocast with float32 weights; both run the head in bf16."""
    N, H, V = 9, 16, 130
    h, w = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) / 2
    y = torch.randint(0, V, (N,), generator=gen)
    outputs = ("log_probs", "entropy")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lib = chunked.ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, None, 1.0, outputs)
        ours = rk_trl.chunked_logprob_apply(h, w, None, y, 1.0, 64, None, 1.0, outputs)
    ref = float64_head(h.bfloat16(), w.bfloat16(), None, y, 1.0)
    assert_close(ours[0], lib[0], ref[0], tol.LOGPROB_ATOL, what="logp")
    assert_close(ours[1], lib[1], ref[1], tol.LOGPROB_ATOL, what="entropy")


def test_labels_out_of_range_raise(gen):
    z = logits(gen, (2, 4, 11))
    bad = labels_like(gen, z)
    bad[1, 2] = 11
    with pytest.raises(RuntimeError):
        tu.selective_log_softmax(z, bad)
    with pytest.raises(ValueError, match="labels"):
        rk_trl.selective_log_softmax(z, bad)
    with pytest.raises(ValueError, match="temperature"):
        rk_trl.selective_log_softmax(z, labels_like(gen, z), temperature=0.0)


def test_fall_through(gen):
    """Options we do not implement run TRL's own function, with one warning per reason."""
    _common._warned.clear()
    z = logits(gen, (2, 3, 17))
    topk = torch.randint(0, 17, (2, 3, 4), generator=gen)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            assert torch.equal(rk_trl.selective_log_softmax(z, topk), tu.selective_log_softmax(z, topk))
        z64 = z.double()
        assert torch.equal(rk_trl.entropy_from_logits(z64), tu.entropy_from_logits(z64))
        h, w, y = torch.randn(5, 4, generator=gen), torch.randn(17, 4, generator=gen), torch.randint(0, 17, (5,))
        for kwargs in [dict(final_logit_softcapping=30.0), dict(logit_scale=0.5)]:
            args = {"final_logit_softcapping": None, "logit_scale": 1.0, "outputs": ("log_probs",), **kwargs}
            ours = rk_trl.chunked_logprob_apply(h, w, None, y, 1.0, 8, *args.values())
            theirs = chunked.ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 8, *args.values())
            assert torch.equal(ours[0], theirs[0])
    ours_warned = [w for w in seen if issubclass(w.category, rk_trl.FallThroughWarning)]
    assert len(ours_warned) == 4, [str(w.message) for w in ours_warned]  # top-K once, float64, softcap, scale
    assert "K labels per position" in str(ours_warned[0].message)


def test_patch_swaps_trl_call_sites():
    """patch() swaps the functions in trl.trainer.utils (and any loaded TRL module holding
    them) and ChunkedLogProbFunction.apply on the class; unpatch() restores them."""
    orig = {n: getattr(tu, n) for n in ("selective_log_softmax", "entropy_from_logits",
                                        "selective_log_softmax_and_entropy")}
    orig_apply = chunked.ChunkedLogProbFunction.apply
    with rk_trl.patch() as handle:
        assert rk_trl.is_patched()
        assert tu.selective_log_softmax is rk_trl.selective_log_softmax
        assert tu.entropy_from_logits is rk_trl.entropy_from_logits
        assert tu.selective_log_softmax_and_entropy is rk_trl.selective_log_softmax_and_entropy
        assert tu._ChunkedLogProbFunction.apply is rk_trl.chunked_logprob_apply
        assert set(handle.replaced) == set(orig) | {"ChunkedLogProbFunction.apply"}
    assert not rk_trl.is_patched()
    for n, f in orig.items():
        assert getattr(tu, n) is f
    assert chunked.ChunkedLogProbFunction.apply == orig_apply
    assert "apply" not in chunked.ChunkedLogProbFunction.__dict__
