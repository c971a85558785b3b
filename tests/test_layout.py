"""Layouts that cross languages are defined twice, once per language (csrc/include/rlhf/layout.h
for C++/CUDA, rlhf_kernels/_layout.py for Python and Triton); this holds the copies together."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext, _layout
from rlhf_kernels.ops import bt as ops_bt
from rlhf_kernels.ops import ppo as ops_ppo

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="native extension not built")


@needs_ext
def test_cpp_and_python_layouts_agree():
    cpp = {k: tuple(v) for k, v in _ext.C.layout().items()}
    assert cpp == _layout.LAYOUT


def test_triton_kernels_use_the_python_layout():
    pytest.importorskip("triton")
    from rlhf_kernels.triton import bt as tri_bt
    from rlhf_kernels.triton import ppo as tri_ppo
    assert tri_ppo.N_POLICY_PARTS.value == len(_layout.POLICY_PARTS)
    assert tri_ppo.N_VALUE_PARTS.value == len(_layout.VALUE_PARTS)
    assert [tri_ppo.S_CLIPFRAC.value, tri_ppo.S_MAX.value] == [0, len(_layout.POLICY_STATS) - 1]
    assert tri_bt.S_MARGIN_MEAN.value == _layout.BT_STATS.index("margin_mean")


@pytest.mark.parametrize("backend", rk.available_backends("cpu"))
def test_stats_come_out_in_layout_order(backend):
    """Each backend's packed statistics are named by the layout: the mapping's keys are the
    layout's names in order, and each value is its packed entry."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, generator=gen)
    mask = torch.rand(3, 9, generator=gen) < 0.8
    _, ps = rk.ppo_policy_loss(x, x + 0.3 * torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen), mask,
                               backend=backend)
    _, vs = rk.ppo_value_loss(x, x + 0.1, torch.randn(3, 9, generator=gen), mask, backend=backend)
    _, bs = rk.bt_loss(x[0], x[1], backend=backend)
    for stats, names in ((ps, ops_ppo.POLICY_STATS), (vs, ops_ppo.VALUE_STATS), (bs, ops_bt.BT_STATS)):
        assert tuple(stats) == names
        assert all(stats[k].dim() == 0 and stats[k].item() == stats.packed[i].item() for i, k in enumerate(names))
        assert dict(stats) == stats.copy()
