"""Layouts that cross the language boundary: the Python copy of csrc/include/rlhf/layout.h.

The torch and triton backends need these without the extension, so they are written here
too; ``rlhf_kernels._C.layout()`` reports the C++ copy and tests/test_layout.py checks that
the two agree.
"""

# the ppo ops' `loss_agg`: its code is the index here (new codes are appended)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
LOSS_AGG_CODES = {name: code for code, name in enumerate(LOSS_AGGS)}

# ppo_policy_fwd's `options`: one int packing the policy loss's choices beyond clipping (one
# schema argument instead of four). Field f holds its code in bits [OPTION_BITS * f,
# OPTION_BITS * (f + 1)); each field's code is the index of its name, code 0 the default, so
# options = 0 is the plain PPO loss. "none" stands for Python's None (not given).
OPTION_BITS = 4
POLICY_OPTIONS = (
    ("ratio_level", ("token", "sequence")),
    ("objective", ("ppo", "cispo")),
    ("is_correction", ("none", "tis", "mis")),
    ("is_level", ("none", "token", "sequence", "geometric")),
)


def option_codes(field):
    """{value: code} of one field of `options`, with None for the code named "none"."""
    names = dict(POLICY_OPTIONS)[field]
    return {(None if name == "none" else name): code for code, name in enumerate(names)}


def pack_options(**codes):
    """The `options` int from field codes (field name -> code; fields left out are 0)."""
    fields = [name for name, _ in POLICY_OPTIONS]
    return sum(code << (OPTION_BITS * fields.index(name)) for name, code in codes.items())


# the order of each loss op's packed statistics (new ones are appended)
POLICY_STATS = ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl",
                "ratio_mean", "ratio_min", "ratio_max", "seq_clipfrac", "is_weight_mean", "is_capped_frac")
VALUE_STATS = ("vf_clipfrac", "explained_var")
BT_STATS = ("accuracy", "margin_mean")
RANKING_STATS = ("accuracy",)
# score_loss's `kind` (its code is the index here), and its packed statistics per kind: both
# kinds pack four, so the packed vector has one length whatever the kind
SCORE_KINDS = ("regression", "ordinal")
SCORE_STATS = {
    "regression": ("mse", "mae", "pred_mean", "pred_std"),
    "ordinal": ("accuracy", "mae", "pred_mean", "pred_std"),
}
N_SCORE_STATS = 4

# one row's float64 partials in the one-launch PPO forwards (CUDA and Triton); row_grad is the
# row's factor in the gradient beside its weight in the loss (row_scale = weight * row_grad)
POLICY_PARTS = ("loss", "count", "low", "high", "dual", "kl", "ratio", "ratio_min", "ratio_max",
                "row_grad", "is_weight", "is_capped")
VALUE_PARTS = ("loss", "count", "clipped", "mean_r", "m2_r", "mean_err", "m2_err")

# linear_policy_loss's packed statistics: the policy loss's, then the means over valid tokens of
# the entropy and of the KL estimator
LINEAR_POLICY_STATS = POLICY_STATS + ("entropy", "kl")
# the KL estimators (kl_penalty's `kind`, linear_policy_loss's `kl_kind`), in the kernels' code order
KL_KINDS = ("k1", "k2", "k3", "abs")

# group_advantages' default `eps`: the C++ ops refuse any other value in the modes that take no
# eps, so the two copies (kDefaultGroupEps, csrc/include/rlhf/group_advantages_op.h) must agree
# exactly (tests/test_layout.py checks them against each other)
DEFAULT_GROUP_EPS = 1e-6

LAYOUT = {
    "loss_aggs": LOSS_AGGS,
    "option_bits": (OPTION_BITS,),
    "policy_options": POLICY_OPTIONS,
    "policy_stats": POLICY_STATS,
    "value_stats": VALUE_STATS,
    "bt_stats": BT_STATS,
    "ranking_stats": RANKING_STATS,
    "score_kinds": SCORE_KINDS,
    "score_regression_stats": SCORE_STATS["regression"],
    "score_ordinal_stats": SCORE_STATS["ordinal"],
    "policy_parts": POLICY_PARTS,
    "value_parts": VALUE_PARTS,
    "linear_policy_stats": LINEAR_POLICY_STATS,
    "kl_kinds": KL_KINDS,
}
