"""rlhf_kernels.integrations.megatron, and verl's Megatron-backend functions in
rlhf_kernels.integrations.verl, against the installed libraries with vocabulary-parallel logits:
2 gloo processes (torch.multiprocessing spawn), megatron's parallel_state initialized with
tensor_model_parallel_size=2, each library's own function and ours on the same slices, both held to
a float64 evaluation on the whole vocabulary (rule: tests/test_integrations_kit.py)."""

import importlib.util
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_integrations_kit import assert_close, assert_grads_close, require

require("megatron.core.tensor_parallel")
pytestmark = pytest.mark.filterwarnings("ignore::rlhf_kernels.integrations.FallThroughWarning")
V_LOCAL = 7
ATOL = 1e-5


def _inputs(world):
    g = torch.Generator().manual_seed(5 + world)
    z = torch.randn(2, 3, V_LOCAL * world, generator=g) * 3
    y = torch.tensor([[0, V_LOCAL * world - 1, V_LOCAL], [3, V_LOCAL + 2, 1]])
    return z, y, torch.randn(2, 3, generator=g)


def _run(f, x, g):
    """f(x) and its gradient wrt x for the upstream gradient g (x cloned: the libraries write
    over their inputs)."""
    x = x.clone().requires_grad_()
    out = f(x * 1)
    grad, = torch.autograd.grad((out.float() * g).sum(), x)
    return out.detach(), grad


def _ref(z, y, g):
    """float64 on the whole vocabulary: (logp, entropy, d logp . g, d entropy . g)."""
    z = z.double().requires_grad_()
    lsm = torch.log_softmax(z, -1)
    lp = lsm.gather(-1, y.unsqueeze(-1))[..., 0]
    h = -(lsm.exp() * lsm).sum(-1)
    g_lp, = torch.autograd.grad((lp * g).sum(), z, retain_graph=True)
    g_h, = torch.autograd.grad((h * g).sum(), z)
    return lp.detach(), h.detach(), g_lp, g_h


def _worker(rank, world, init_file, with_verl):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a hang fails, never blocks
    from megatron.core import parallel_state, tensor_parallel
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    import rlhf_kernels.integrations.megatron as rk_megatron
    try:
        z, y, g = _inputs(world)
        zl = z[..., rank * V_LOCAL:(rank + 1) * V_LOCAL]
        lp, h, g_lp, g_h = _ref(z, y, g)
        sl = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)

        lib = _run(lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, y), zl, g)
        with rk_megatron.patch() as handle:
            assert handle.replaced.get("vocab_parallel_cross_entropy", 0) >= 2, handle.replaced
            kept = zl.clone()
            ours = _run(lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, y), zl, g)
            assert torch.equal(zl, kept)
        assert_close(ours[0], lib[0], -lp, ATOL, what="megatron cross entropy")
        assert_grads_close([ours[1]], [lib[1]], [-g_lp[..., sl]], what="megatron cross entropy grad")

        if with_verl:
            import rlhf_kernels.integrations.verl as rk_verl
            import verl.utils.megatron.tensor_parallel as vtp
            cases = [
                ("vocab_parallel_log_probs_from_logits", lambda f: (lambda x: f(x, y)), lp, g_lp),
                ("vocab_parallel_entropy", lambda f: f, h, g_h),
                # one chunk: verl's own backward fails with two or more (its backward writes over
                # the chunk, a view that another chunk's graph saved); ours has no chunks
                ("vocab_parallel_entropy_with_chunking", lambda f: (lambda x: f(x, chunk_size=2048)), h, g_h),
            ]
            libs = [_run(bind(getattr(vtp, name)), zl, g) for name, bind, _, _ in cases]
            with rk_verl.patch() as handle:
                outs = [_run(bind(getattr(vtp, name)), zl, g) for name, bind, _, _ in cases]
                assert all(handle.replaced.get(c[0], 0) >= 1 for c in cases), handle.replaced
                small = _run(lambda x: vtp.vocab_parallel_entropy_with_chunking(x, chunk_size=2), zl, g)
                assert torch.equal(small[0], outs[2][0]) and torch.equal(small[1], outs[2][1])
            for (name, _, ref, ref_grad), lib, ours in zip(cases, libs, outs):
                assert_close(ours[0], lib[0], ref, ATOL, what=name)
                assert_grads_close([ours[1]], [lib[1]], [ref_grad[..., sl]], what=name + " grad")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_vocab_parallel_against_the_libraries():
    with_verl = importlib.util.find_spec("verl") is not None
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, os.path.join(d, "init"), with_verl), nprocs=2, join=True,
                           start_method="spawn")
