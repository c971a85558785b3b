"""How the Triton ops launch (the per-call ticket counter and the device guard): every Triton op entry runs on its tensors'
device (the device guard in rlhf_kernels/triton/_op.py), and a PPO forward's ticket counter is
made and zeroed per call, never cached or shared between calls.

CPU tests run under the interpreter; the multi-GPU test needs two GPUs."""

import importlib
import pkgutil

import pytest
import torch

import rlhf_kernels as rk
import rlhf_kernels.triton
from rlhf_kernels import _signatures
from rlhf_kernels.triton import _op
from tests import test_cuda_graphs as graphs

pytestmark = pytest.mark.skipif("triton" not in rk.available_backends("cpu") and not torch.cuda.is_available(),
                                reason="triton is not installed" if not rk._backend.triton_installed()
                                else "Triton not usable here")


def _triton_ops():
    """name -> Op, every Op instance in the rlhf_kernels.triton modules."""
    ops = {}
    for info in pkgutil.iter_modules(rlhf_kernels.triton.__path__):
        module = importlib.import_module("rlhf_kernels.triton." + info.name)
        ops.update({v.name: v for v in vars(module).values() if isinstance(v, _op.Op)})
    return ops


def _small_inputs(device):
    """test_cuda_graphs' inputs at sizes the interpreter runs quickly."""
    return graphs._inputs(device, seed=4321, B=3, T=21, V=37, H=16, pairs=19, ranked=(5, 4), cuts=(10, 40),
                          weight_div=4)


# group_advantages is not in test_cuda_graphs.OPS (its capture tests live in its own file)
EXTRA = {
    "group_advantages": lambda x, b: (rk.group_advantages(x["chosen"][:18], group_size=3, backend=b),),
    "group_advantages_masked": lambda x, b: rk.group_advantages(x["chosen"][:3], group_size=3, mask=x["mask"],
                                                                backend=b),
}


def _call_every_op(device):
    """Every public op on the triton backend, forward and backward (test_cuda_graphs' list)."""
    for name in graphs.OPS:
        x = _small_inputs(device)
        for k in graphs.OPS[name][1]:
            x[k] = x[k].detach().requires_grad_()
        fn, diff = graphs.OPS[name]
        out = fn(x, "triton")
        if diff:
            total = sum(o.sum() for o in out if o.requires_grad)
            torch.autograd.grad(total, [x[k] for k in diff])
    x = _small_inputs(device)
    for fn in EXTRA.values():
        fn(x, "triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run; on a GPU see the cuda:1 test")
def test_every_triton_op_takes_the_device_guard(monkeypatch):
    calls = []
    real = _op.on_device

    def spy(fn, args):
        calls.append(fn)
        return real(fn, args)

    monkeypatch.setattr(_op, "on_device", spy)  # the ops look it up per call
    _call_every_op("cpu")
    ops = _triton_ops()
    by_function = {op.fn: name for name, op in ops.items()}
    by_function.update({op.function.apply: name for name, op in ops.items() if isinstance(op, _op.DifferentiableOp)})
    taken = {by_function[f] for f in calls if f in by_function}
    assert len(ops) >= 21 and taken == set(ops), "not taken by: %s" % sorted(set(ops) - taken)


def test_device_guard_passes_cpu_calls_through(monkeypatch):
    switched = []
    monkeypatch.setattr(torch.cuda, "device", lambda index: switched.append(index))
    x = torch.ones(3)
    assert _op.on_device(lambda *a: a, (x, None, 2.0)) == (x, None, 2.0)
    assert switched == []


def test_every_triton_op_schema_starts_with_a_tensor(monkeypatch):
    monkeypatch.setitem(_signatures.SCHEMAS, "bad_guard_test", "(Tensor? x) -> Tensor")
    with pytest.raises(ValueError, match="Tensor first argument"):
        _op.Op("bad_guard_test", lambda x: x)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_ops_on_a_device_that_is_not_current():
    """Tensors on cuda:1 while device 0 is current: every op gives what it gives on cuda:0
    (bitwise), and the current device is still 0 afterwards."""
    assert "triton" in rk.available_backends("cuda")
    torch.cuda.set_device(0)
    for name in graphs.OPS:
        fn, diff = graphs.OPS[name]
        results = []
        for device in ("cuda:1", "cuda:0"):
            x = {k: t.to(device) for k, t in _small_inputs("cpu").items()}
            for k in diff:
                x[k] = x[k].detach().requires_grad_()
            out = tuple(fn(x, "triton"))
            if diff:
                total = sum(o.sum() for o in out if o.requires_grad)
                out += tuple(torch.autograd.grad(total, [x[k] for k in diff]))
            assert all(o.device == torch.device(device) for o in out), name
            torch.cuda.synchronize(device)
            results.append(tuple(o.detach().cpu() for o in out))
            assert torch.cuda.current_device() == 0, name
        for a, b in zip(*results):
            assert torch.equal(a, b), name


# ---- F1: the PPO forwards' ticket counter (rlhf_kernels/triton/ppo.py, _scratch)

def _spy_launches(monkeypatch, ppo, kernel_name, launches):
    """Wrap ppo.<kernel_name> so each launch records its scratch and the counter at launch."""
    kernel = getattr(ppo, kernel_name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                scratch = args[5] if kernel_name == "_policy_fwd_kernel" else args[4]
                counter = scratch[-1:].view(torch.int32)[0].item()  # the last float64 slot's first int32
                launches.append((scratch, counter, grid))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(ppo, kernel_name, Spy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run; on a GPU see test_cuda_graphs.py")
@pytest.mark.parametrize("loss", ["policy", "value"])
def test_ppo_counter_is_per_call(monkeypatch, loss):
    """Each forward draws tickets from its own counter, zero at launch, in memory no other call
    holds: a counter left non-zero by one launch (here: poisoned after the call, as a second
    launch sharing it would leave it) cannot reach the next call, which stays exact."""
    from rlhf_kernels.triton import ppo
    gen = torch.Generator().manual_seed(5)
    B, T = 3, 19
    lp, old, adv = (torch.randn(B, T, generator=gen) for _ in range(3))
    mask = torch.rand(B, T, generator=gen) < 0.8
    launches = []
    _spy_launches(monkeypatch, ppo, "_%s_fwd_kernel" % loss, launches)
    assert not [v for v in vars(ppo).values() if isinstance(v, dict) and any(
        isinstance(t, torch.Tensor) for t in v.values())], "a tensor cache in triton/ppo.py"

    def call():
        if loss == "policy":
            out = rk.ppo_policy_loss(lp, old, adv, mask, backend="triton")
        else:
            out = rk.ppo_value_loss(lp, old, adv, mask, backend="triton")
        return out[0], out[1].packed

    first = call()
    launches[0][0].fill_(7.0)  # tickets drawn by some other launch, had it shared this memory
    second = call()
    assert len(launches) == 2 and all(counter == 0 for _, counter, _ in launches)
    assert launches[0][0].data_ptr() != launches[1][0].data_ptr()
    (scratch, _, grid) = launches[1]
    n_parts = len(ppo.POLICY_PARTS if loss == "policy" else ppo.VALUE_PARTS)
    assert scratch.dtype == torch.float64 and scratch.numel() == grid[0] * n_parts + 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    want = (rk.ppo_policy_loss if loss == "policy" else rk.ppo_value_loss)(lp, old, adv, mask, backend="torch")
    torch.testing.assert_close(second[0], want[0].float(), rtol=2e-5, atol=1e-6)
