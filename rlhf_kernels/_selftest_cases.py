"""The self-test's cases, written as data: one row per public op (a few ops have a second row for
options that take other kernel paths). ``python -m rlhf_kernels.selftest`` runs each row on every
backend, device and dtype (rlhf_kernels/selftest.py).

A row holds:
    make(gen, n)  the inputs, float64 (or int, bool) on the CPU, at small odd shapes with n rows:
                  random, of size O(1), never zeros. The float ones are rounded to the case's
                  dtype; the reference then runs on those rounded values, upcast.
    ours(x, b)    the public op on backend ``b`` -> {output name: tensor}
    exact(x)      the eager reference (rlhf_kernels/reference/) -> the same names
    diff          the inputs that receive gradients: the backward is that of a fixed random
                  weighting of the outputs that carry a gradient
    kinds         output name -> tolerance rule (rlhf_kernels/tolerances.py: SELFTEST_RULES);
                  "*" for the rest; gradients are held to "grad"
    rows          for the batch-invariance check, (inputs cut along dim 0, outputs and
                  gradients compared row by row), or None
    torch_low     for the fused heads, whose torch backend forms the logits in the inputs' dtype
                  as eager PyTorch does (and computes the rest in float32 and float64):
                  torch_low(x, dtype), the float64 reference on those logits, which that
                  backend's outputs and gradients are held to in bfloat16 (PyTorch's own error:
                  its gradients with x in that dtype). Not the float64 gradients: a token whose
                  ratio lies within the logits' rounding of a clip edge is clipped on the other
                  side there, its whole gradient gone
"""

from collections import namedtuple

import torch

import rlhf_kernels as rk
from rlhf_kernels.reference import bt as ref_bt
from rlhf_kernels.reference import gae as ref_gae
from rlhf_kernels.reference import group_advantages as ref_group
from rlhf_kernels.reference import linear_logprobs as ref_linear
from rlhf_kernels.reference import linear_policy as ref_head
from rlhf_kernels.reference import logprobs as ref_lp
from rlhf_kernels.reference import ppo as ref_ppo
from rlhf_kernels.reference import score as ref_score

Case = namedtuple("Case", "name op n make ours exact diff kinds rows torch_low", defaults=(None,))
Rows = namedtuple("Rows", "inputs outputs")

IGNORE = -100
V, H, T = 131, 48, 29   # a prime vocabulary (no block divides it), a hidden size, a sequence length
F64 = torch.float64


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def mask(g, *shape):
    """~80% valid, the first row's last third padded."""
    m = torch.rand(*shape, generator=g) < 0.8
    m[0, -(shape[1] // 3 + 1):] = False
    return m


def labels(g, *shape, ignore=0.25):
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(*shape, generator=g) < ignore] = IGNORE
    return y


def loss_and_stats(out):
    loss, stats = out[:2]
    return {"loss": loss, **dict(stats)}


# ---- inputs ----

def gae_inputs(g, n):
    return {"rewards": randn(g, n, T), "values": randn(g, n, T), "mask": mask(g, n, T), "last": randn(g, n)}


def packed_inputs(g, n):
    lens = torch.randint(1, 2 * T, (n,), generator=g)
    lens[n // 2] = 0  # an empty sequence
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    N = int(cu[-1])
    return {"rewards": randn(g, N), "values": randn(g, N), "cu_seqlens": cu, "mask": torch.rand(N, generator=g) < 0.8}


def logits_inputs(g, n):
    z = randn(g, n, V, scale=3.0)
    return {"logits": z, "ref_logits": z + randn(g, n, V, scale=0.5), "labels": labels(g, n)}


def head_inputs(g, n):
    return {"hidden": randn(g, n, H), "weight": randn(g, V, H, scale=2 / H ** 0.5), "bias": randn(g, V, scale=0.1),
            "labels": labels(g, n)}


def policy_head_inputs(g, n):
    """[n, 7] tokens: labels garbage where masked (the op must not read them), old and ref
    log-probs near the exact ones (ratios on both sides of the clip range)."""
    Tn = 7
    x = head_inputs(g, n * Tn)
    x["hidden"] = x["hidden"].reshape(n, Tn, H)
    m = mask(g, n, Tn)
    y = torch.randint(0, V, (n, Tn), generator=g)
    x["labels"] = torch.where(m, y, torch.tensor([IGNORE, V, -7])[torch.randint(0, 3, (n, Tn), generator=g)])
    logp = ref_linear.linear_token_logprobs(x["hidden"], x["weight"], torch.where(m, y, IGNORE), x["bias"])[0]
    x.update(mask=m, old=logp + randn(g, n, Tn, scale=0.3), adv=randn(g, n, Tn, scale=2.0),
             ref_lp=logp + randn(g, n, Tn, scale=0.2))
    return x


def policy_inputs(g, n):
    lp = -3 * torch.rand(n, T, generator=g, dtype=F64)
    old = lp + randn(g, n, T, scale=0.4)
    m = mask(g, n, T)
    m[-1] = False  # a fully masked row
    return {"lp": lp, "old": old, "adv": randn(g, n, T, scale=2.0), "mask": m, "roll": old + randn(g, n, T, scale=0.3)}


def value_inputs(g, n):
    v = randn(g, n, T)
    return {"values": v, "old": v + randn(g, n, T, scale=0.3), "returns": v + randn(g, n, T), "mask": mask(g, n, T)}


def pair_inputs(g, n):
    return {"chosen": randn(g, n, scale=2.0), "rejected": randn(g, n, scale=2.0),
            "margin": 0.5 * torch.rand(n, generator=g, dtype=F64)}


def ranking_inputs(g, n):
    return {"rewards": randn(g, n, 5, scale=2.0), "valid": torch.rand(n, 5, generator=g) < 0.8}


def score_inputs(g, n):
    """Predictions, float targets, and levels of a K = 5 ordinal model with well-spaced thresholds
    (increasing after rounding to any dtype)."""
    return {"pred": randn(g, n, scale=2.0), "target": randn(g, n, scale=2.0),
            "level": torch.randint(0, 5, (n,), generator=g),
            "thresholds": torch.tensor([-2.5, -0.75, 0.5, 2.0], dtype=F64) + 0.2 * torch.rand(4, generator=g, dtype=F64)}


def group_inputs(g, n):
    return {"rewards": randn(g, n, scale=2.0), "ids": torch.randint(-3, 6, (n,), generator=g) * 1000,
            "mask": torch.rand(n, 7, generator=g) < 0.8}


def kl_inputs(g, n):
    lp = -3 * torch.rand(n, T, generator=g, dtype=F64)
    return {"lp": lp, "ref_lp": lp + randn(g, n, T, scale=0.3)}


# ---- the calls ----

def _policy(x, b, **kw):
    return loss_and_stats(rk.ppo_policy_loss(x["lp"], x["old"], x["adv"], x["mask"], clip_low=0.2, clip_high=0.28,
                                             backend=b, **kw))


def _policy_ref(x, **kw):
    return loss_and_stats(ref_ppo.ppo_policy_loss(x["lp"], x["old"], x["adv"], x["mask"], 0.2, 0.28, **kw))


GSPO = dict(ratio_level="sequence", is_correction="tis", is_level="geometric", loss_agg="token-sum")
CISPO = dict(objective="cispo", is_correction="mis", is_level="sequence")
HEAD = dict(temperature=0.9, kl_coef=0.05, entropy_coef=0.01, clip_high=0.28, dual_clip=3.0)


def _head(x, b):
    out = rk.linear_policy_loss(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["mask"], bias=x["bias"],
                                ref_logprobs=x["ref_lp"], validate=False, backend=b, **HEAD)
    return loss_and_stats(out)


def _head_ref(x):
    loss, stats, logp = ref_head.linear_policy_loss(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"],
                                                    x["mask"], x["bias"], ref_logprobs=x["ref_lp"], **HEAD)
    return {"loss": loss, **stats, "logprobs": logp}


def _low_logits(x, dtype):
    """hidden @ weight.T + bias with the values of the torch backend's logits, formed in ``dtype``,
    and the gradient of the logits in x's dtype: the rounding enters as a constant."""
    logits = x["hidden"] @ x["weight"].T + x["bias"]
    low = x["hidden"].to(dtype) @ x["weight"].to(dtype).T + x["bias"].to(dtype)
    return logits + (low.double() - logits).detach()


def _linear_low(x, dtype):
    return _pair(("logp", "entropy"), ref_lp.token_logprobs(_low_logits(x, dtype), x["labels"], 0.8, IGNORE))


def _head_low(x, dtype):
    f64 = {k: t.double() if t.is_floating_point() else t for k, t in x.items()}
    loss, stats, logp = ref_head.logits_policy_loss(_low_logits(x, dtype), x["labels"], f64["old"], f64["adv"],
                                                    x["mask"], ref_logprobs=f64["ref_lp"], **HEAD)
    return {"loss": loss, **stats, "logprobs": logp}


def _group(x, b, **kw):
    adv, tok = rk.group_advantages(x["rewards"], x["ids"], mask=x["mask"], backend=b, **kw)
    return {"advantages": adv, "token_advantages": tok}


def _group_ref(x, mode="grpo"):
    adv = ref_group.group_advantages(x["rewards"], x["ids"], None, mode)
    return {"advantages": adv, "token_advantages": ref_group.masked(adv, x["mask"])}


def _pair(names, out):
    return dict(zip(names, out))


ROW_LOGP = Rows(("logits", "ref_logits", "labels"), ("logp", "entropy", "kl", "d_logits"))

CASES = [
    Case("gae", "gae", 5, gae_inputs,
         lambda x, b: _pair(("advantages", "returns"), rk.gae(x["rewards"], x["values"], x["mask"], gamma=0.99,
                                                              lam=0.95, last_values=x["last"], backend=b)),
         lambda x: _pair(("advantages", "returns"), ref_gae.gae(x["rewards"], x["values"], x["mask"], 0.99, 0.95,
                                                                x["last"])),
         (), {"*": "advantage"}, None),
    Case("gae_packed", "gae_packed", 5, packed_inputs,
         lambda x, b: _pair(("advantages", "returns"), rk.gae_packed(
             x["rewards"], x["values"], x["cu_seqlens"], gamma=0.99, lam=0.95, mask=x["mask"], validate=False,
             backend=b)),
         lambda x: _pair(("advantages", "returns"), ref_gae.gae_packed(x["rewards"], x["values"], x["cu_seqlens"],
                                                                       0.99, 0.95, None, x["mask"])),
         (), {"*": "advantage"}, None),
    Case("masked_whiten", "masked_whiten", 5, gae_inputs,
         lambda x, b: {"whitened": rk.masked_whiten(x["rewards"], x["mask"], backend=b)},
         lambda x: {"whitened": ref_gae.masked_whiten(x["rewards"], x["mask"])},
         (), {"*": "advantage"}, None),
    Case("token_logprobs", "token_logprobs", 9, logits_inputs,
         lambda x, b: _pair(("logp", "entropy"), rk.token_logprobs(
             x["logits"], x["labels"], temperature=0.9, return_entropy=True, validate=False, backend=b)),
         lambda x: _pair(("logp", "entropy"), ref_lp.token_logprobs(x["logits"], x["labels"], 0.9, IGNORE)),
         ("logits",), {"*": "logprob"}, ROW_LOGP),
    Case("token_entropy", "token_entropy", 9, logits_inputs,
         lambda x, b: {"entropy": rk.token_entropy(x["logits"], temperature=0.7, backend=b)},
         lambda x: {"entropy": ref_lp.token_entropy(x["logits"], 0.7)},
         ("logits",), {"*": "logprob"}, ROW_LOGP),
    Case("full_kl", "full_kl", 9, logits_inputs,
         lambda x, b: {"kl": rk.full_kl(x["logits"], x["ref_logits"], temperature=1.1, backend=b)},
         lambda x: {"kl": ref_lp.full_kl(x["logits"], x["ref_logits"].detach(), 1.1)},
         ("logits",), {"*": "logprob"}, ROW_LOGP),
    Case("kl_penalty", "kl_penalty", 5, kl_inputs,
         lambda x, b: {"k3": rk.kl_penalty(x["lp"], x["ref_lp"], "k3", backend=b)},
         lambda x: {"k3": ref_lp.kl_penalty(x["lp"], x["ref_lp"], "k3")},
         ("lp", "ref_lp"), {"*": "logprob"}, None),
    Case("linear_token_logprobs", "linear_token_logprobs", 11, head_inputs,
         lambda x, b: _pair(("logp", "entropy"), rk.linear_token_logprobs(
             x["hidden"], x["weight"], x["labels"], bias=x["bias"], temperature=0.8, return_entropy=True,
             validate=False, backend=b)),
         lambda x: _pair(("logp", "entropy"), ref_linear.linear_token_logprobs(
             x["hidden"], x["weight"], x["labels"], x["bias"], 0.8, IGNORE)),
         ("hidden", "weight", "bias"), {"*": "logprob"}, Rows(("hidden", "labels"), ("logp", "entropy", "d_hidden")),
         _linear_low),
    Case("linear_policy_loss", "linear_policy_loss", 3, policy_head_inputs, _head, _head_ref,
         ("hidden", "weight", "bias"), {"loss": "loss", "logprobs": "logprob", "*": "stat"},
         Rows(("hidden", "labels", "old", "adv", "mask", "ref_lp"), ("logprobs",)), _head_low),
    Case("ppo_policy_loss", "ppo_policy_loss", 6, policy_inputs,
         lambda x, b: _policy(x, b, dual_clip=3.0), lambda x: _policy_ref(x, dual_clip=3.0),
         ("lp",), {"loss": "loss", "*": "stat"}, None),
    Case("ppo_policy_loss[gspo,tis]", "ppo_policy_loss", 6, policy_inputs,
         lambda x, b: _policy(x, b, rollout_logprobs=x["roll"], **GSPO),
         lambda x: _policy_ref(x, rollout_logprobs=x["roll"], **GSPO),
         ("lp",), {"loss": "loss", "*": "stat"}, None),
    Case("ppo_policy_loss[cispo,mis]", "ppo_policy_loss", 6, policy_inputs,
         lambda x, b: _policy(x, b, rollout_logprobs=x["roll"], **CISPO),
         lambda x: _policy_ref(x, rollout_logprobs=x["roll"], **CISPO),
         ("lp",), {"loss": "loss", "*": "stat"}, None),
    Case("ppo_value_loss", "ppo_value_loss", 6, value_inputs,
         lambda x, b: loss_and_stats(rk.ppo_value_loss(x["values"], x["old"], x["returns"], x["mask"], clip=0.2,
                                                       loss_agg="seq-mean-token-mean", backend=b)),
         lambda x: loss_and_stats(ref_ppo.ppo_value_loss(x["values"], x["old"], x["returns"], x["mask"], 0.2,
                                                         "seq-mean-token-mean")),
         ("values",), {"loss": "loss", "*": "stat"}, None),
    Case("bt_loss", "bt_loss", 37, pair_inputs,
         lambda x, b: loss_and_stats(rk.bt_loss(x["chosen"], x["rejected"], margin=x["margin"], label_smoothing=0.1,
                                                center_coef=0.01, backend=b)),
         lambda x: loss_and_stats(ref_bt.bt_loss(x["chosen"], x["rejected"], x["margin"], 0.1, 0.01)),
         ("chosen", "rejected"), {"loss": "bt", "*": "stat"}, None),
    Case("ranking_loss", "ranking_loss", 9, ranking_inputs,
         lambda x, b: loss_and_stats(rk.ranking_loss(x["rewards"], valid=x["valid"], backend=b)),
         lambda x: loss_and_stats(ref_bt.ranking_loss(x["rewards"], x["valid"])),
         ("rewards",), {"loss": "bt", "*": "stat"}, None),
    Case("score_loss", "score_loss", 37, score_inputs,
         lambda x, b: loss_and_stats(rk.score_loss(x["pred"], x["target"], backend=b)),
         lambda x: loss_and_stats(ref_score.score_loss(x["pred"], x["target"])),
         ("pred",), {"loss": "bt", "*": "stat"}, None),
    Case("score_loss[ordinal]", "score_loss", 37, score_inputs,
         lambda x, b: loss_and_stats(rk.score_loss(x["pred"], x["level"], kind="ordinal", thresholds=x["thresholds"],
                                                   backend=b)),
         lambda x: loss_and_stats(ref_score.score_loss(x["pred"], x["level"], "ordinal", x["thresholds"])),
         ("pred", "thresholds"), {"loss": "bt", "*": "stat"}, None),
    Case("group_advantages", "group_advantages", 23, group_inputs, _group, _group_ref,
         (), {"*": "group"}, None),
    Case("group_advantages[reinforce++]", "group_advantages", 23, group_inputs,
         lambda x, b: _group(x, b, mode="reinforce++"), lambda x: _group_ref(x, "reinforce++"),
         (), {"*": "group"}, None),
]
