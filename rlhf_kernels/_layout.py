"""Layouts that cross the language boundary: the Python copy of csrc/include/rlhf/layout.h.

The torch and triton backends need these without the extension, so they are written here
too; ``rlhf_kernels._C.layout()`` reports the C++ copy and tests/test_layout.py checks that
the two agree.
"""

# the ppo ops' `loss_agg`: its code is the index here
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOSS_AGG_CODES = {name: code for code, name in enumerate(LOSS_AGGS)}

# the order of each loss op's packed statistics
POLICY_STATS = ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                "ratio_mean", "ratio_min", "ratio_max")
VALUE_STATS = ("vf_clipfrac", "explained_var")
BT_STATS = ("accuracy", "margin_mean")
RANKING_STATS = ("accuracy",)

# one row's float64 partials in the one-launch PPO forwards (CUDA and Triton)
POLICY_PARTS = ("loss", "count", "low", "high", "dual", "kl", "ratio", "ratio_min", "ratio_max")
VALUE_PARTS = ("loss", "count", "clipped", "mean_r", "m2_r", "mean_err", "m2_err")

LAYOUT = {
    "loss_aggs": LOSS_AGGS,
    "policy_stats": POLICY_STATS,
    "value_stats": VALUE_STATS,
    "bt_stats": BT_STATS,
    "ranking_stats": RANKING_STATS,
    "policy_parts": POLICY_PARTS,
    "value_parts": VALUE_PARTS,
}
