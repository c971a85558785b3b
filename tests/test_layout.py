"""Layouts that cross languages are defined twice, once per language (csrc/include/rlhf/layout.h
for C++/CUDA, rlhf_kernels/_layout.py for Python and Triton); this holds the copies together."""

import inspect
import math

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
    pytest.importorskip("triton", reason="triton is not installed")
    from rlhf_kernels.triton import bt as tri_bt
    from rlhf_kernels.triton import ppo as tri_ppo
    assert tri_ppo.N_POLICY_PARTS.value == len(_layout.POLICY_PARTS)
    assert tri_ppo.N_VALUE_PARTS.value == len(_layout.VALUE_PARTS)
    aggs = dict(TOKEN_MEAN="token-mean", SEQ_MEAN_TOKEN_MEAN="seq-mean-token-mean",
                SEQ_MEAN_TOKEN_SUM="seq-mean-token-sum", SEQ_MEAN_TOKEN_SUM_NORM="seq-mean-token-sum-norm",
                TOKEN_SUM="token-sum")
    assert {getattr(tri_ppo, "AGG_" + k).value for k in aggs} == set(range(len(_layout.LOSS_AGGS)))
    for k, name in aggs.items():
        assert getattr(tri_ppo, "AGG_" + k).value == _layout.LOSS_AGG_CODES[name], k
    is_codes = _layout.option_codes("is_correction")
    assert (tri_ppo.IS_NONE.value, tri_ppo.IS_MASK.value) == (is_codes[None], is_codes["mis"])
    value_parts = dict(LOSS="loss", COUNT="count", CLIPPED="clipped", MEAN_R="mean_r", M2_R="m2_r",
                       MEAN_E="mean_err", M2_E="m2_err")
    for k, name in value_parts.items():
        assert getattr(tri_ppo, "VP_" + k).value == _layout.VALUE_PARTS.index(name), k
    # every index the policy kernels use, by its name in the layout
    parts = dict(LOSS="loss", COUNT="count", LOW="low", HIGH="high", DUAL="dual", KL="kl", RATIO="ratio",
                 MIN="ratio_min", MAX="ratio_max", ROW_GRAD="row_grad", IS_WEIGHT="is_weight", IS_CAPPED="is_capped")
    assert {getattr(tri_ppo, "PP_" + k).value for k in parts} == set(range(len(_layout.POLICY_PARTS)))
    for k, name in parts.items():
        assert getattr(tri_ppo, "PP_" + k).value == _layout.POLICY_PARTS.index(name), k
    stats = dict(CLIPFRAC="clipfrac", LOW="clipfrac_low", HIGH="clipfrac_high", DUAL="dual_clipfrac", KL="approx_kl",
                 RATIO="ratio_mean", MIN="ratio_min", MAX="ratio_max", SEQ_CLIPFRAC="seq_clipfrac",
                 IS_WEIGHT_MEAN="is_weight_mean", IS_CAPPED_FRAC="is_capped_frac")
    assert {getattr(tri_ppo, "S_" + k).value for k in stats} == set(range(len(_layout.POLICY_STATS)))
    for k, name in stats.items():
        assert getattr(tri_ppo, "S_" + k).value == _layout.POLICY_STATS.index(name), k
    assert tri_bt.S_MARGIN_MEAN.value == _layout.BT_STATS.index("margin_mean")
    from rlhf_kernels.triton import score as tri_score
    for kind, first in (("regression", "mse"), ("ordinal", "accuracy")):
        names = _layout.SCORE_STATS[kind]
        assert len(names) == _layout.N_SCORE_STATS
        assert [tri_score.S_FIRST.value, tri_score.S_MAE.value, tri_score.S_PRED_MEAN.value,
                tri_score.S_PRED_STD.value] == [names.index(k) for k in (first, "mae", "pred_mean", "pred_std")]
    assert tri_score.ORDINAL == _layout.SCORE_KINDS.index("ordinal")
    from rlhf_kernels.triton import linear_policy as tri_lp
    assert tri_lp._KL_CODES == {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
    assert tuple(tri_lp._KL_CODES) == _layout.KL_KINDS


@needs_ext
def test_default_group_eps_is_the_cpp_default():
    """group_advantages' default eps has one Python source (_layout.DEFAULT_GROUP_EPS, which
    the op's signature takes) and must equal C++'s kDefaultGroupEps exactly: the native op
    takes exactly that value in a mode without eps and refuses the doubles beside it."""
    from rlhf_kernels.ops import group_advantages as ops_ga
    assert ops_ga.DEFAULT_EPS == _layout.DEFAULT_GROUP_EPS
    assert inspect.signature(rk.group_advantages).parameters["eps"].default == _layout.DEFAULT_GROUP_EPS
    op = torch.ops.rlhf_kernels.group_advantages.default
    rewards = torch.tensor([0.5, -1.25, 2.0, 0.75])
    for mode in ("rloo", "dr_grpo"):
        op(rewards, None, 2, mode, _layout.DEFAULT_GROUP_EPS)
        for off in (math.nextafter(_layout.DEFAULT_GROUP_EPS, 0.0), math.nextafter(_layout.DEFAULT_GROUP_EPS, 1.0)):
            with pytest.raises((ValueError, RuntimeError), match="eps"):
                op(rewards, None, 2, mode, off)


def test_existing_codes_and_stats_keep_their_place():
    """New loss_agg codes and statistics are appended: what callers already index never moves."""
    assert _layout.LOSS_AGGS[:4] == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                     "seq-mean-token-sum-norm")
    assert _layout.LOSS_AGG_CODES["token-sum"] == 4
    assert _layout.POLICY_STATS[:8] == ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                                        "ratio_mean", "ratio_min", "ratio_max")


def test_policy_options_bit_layout():
    """`options` packs one field per OPTION_BITS bits, in POLICY_OPTIONS order; code 0 of each is
    the default (None where the name is "none"), so the plain loss is options = 0."""
    bits = _layout.OPTION_BITS
    assert all(len(names) <= 1 << bits for _, names in _layout.POLICY_OPTIONS)
    for f, (field, names) in enumerate(_layout.POLICY_OPTIONS):
        codes = _layout.option_codes(field)
        assert sorted(codes.values()) == list(range(len(names)))
        for value, code in codes.items():
            assert _layout.pack_options(**{field: code}) == code << (bits * f)
    assert _layout.option_codes("is_correction")[None] == 0 and _layout.option_codes("is_level")[None] == 0
    assert [names[0] for _, names in _layout.POLICY_OPTIONS][:2] == ["token", "ppo"]
    assert _layout.pack_options(ratio_level=1, objective=1, is_correction=2, is_level=3) == \
        1 | 1 << bits | 2 << 2 * bits | 3 << 3 * bits


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
    h, w = torch.randn(3, 9, 8, generator=gen), torch.randn(20, 8, generator=gen)
    _, ls = rk.linear_policy_loss(h, w, torch.randint(0, 20, (3, 9), generator=gen), x, x + 0.5, mask, ref_logprobs=x,
                                  kl_coef=0.1, backend=backend)
    _, rs = rk.score_loss(x[0], x[1], backend=backend)
    _, os_ = rk.score_loss(x[0], torch.randint(0, 4, (9,), generator=gen), kind="ordinal",
                           thresholds=torch.tensor([-1.0, 0.0, 1.0]), backend=backend)
    for stats, names in ((ps, ops_ppo.POLICY_STATS), (vs, ops_ppo.VALUE_STATS), (bs, ops_bt.BT_STATS),
                         (ls, _layout.LINEAR_POLICY_STATS), (rs, _layout.SCORE_STATS["regression"]),
                         (os_, _layout.SCORE_STATS["ordinal"])):
        assert tuple(stats)[:len(names)] == names
        assert all(stats[k].dim() == 0 and stats[k].item() == stats.packed[i].item() for i, k in enumerate(names))
        assert dict(stats) == stats.copy()
    # linear_policy_loss: the policy loss's statistics first, in their order, then entropy and kl, and
    # the per-token logprobs outside the packed vector
    assert _layout.LINEAR_POLICY_STATS[:len(_layout.POLICY_STATS)] == _layout.POLICY_STATS
    assert ls.packed.shape == (len(_layout.LINEAR_POLICY_STATS),) and tuple(ls) == _layout.LINEAR_POLICY_STATS + (
        "logprobs",)
