"""Bad input gets the same answer on every backend: the same exception type, naming the
argument. The native ops check in C++ (csrc/include/rlhf/checks.h), the torch and triton
backends in Python (rlhf_kernels/ops/_validate.py); this file holds them to one contract:
TypeError for a wrong type or dtype, ValueError for a wrong shape or value."""

import math

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend

BACKENDS = _backend.available("cpu")


def _bt(**kw):
    return dict(chosen=torch.randn(5), rejected=torch.randn(5)) | kw


def _score(**kw):
    return dict(pred=torch.randn(5), score=torch.tensor([0, 1, 2, 3, 1]), kind="ordinal",
                thresholds=torch.tensor([-1.0, 0.0, 1.0])) | kw


def _ppo(**kw):
    x = torch.randn(3, 8)
    return dict(logprobs=x, old_logprobs=x + 0.1, advantages=torch.randn(3, 8),
                mask=torch.rand(3, 8) < 0.7) | kw


def _value(**kw):
    x = torch.randn(3, 8)
    return dict(values=x, old_values=x + 0.1, returns=torch.randn(3, 8), mask=torch.rand(3, 8) < 0.7) | kw


def _gae(**kw):
    return dict(rewards=torch.randn(2, 6), values=torch.randn(2, 6), mask=torch.rand(2, 6) < 0.7) | kw


def _packed(**kw):
    return dict(rewards=torch.randn(6), values=torch.randn(6), cu_seqlens=torch.tensor([0, 2, 6])) | kw


def _logits(**kw):
    return dict(logits=torch.randn(2, 3, 11), labels=torch.randint(0, 11, (2, 3))) | kw


def _linear(**kw):
    return dict(hidden=torch.randn(4, 8), weight=torch.randn(13, 8), labels=torch.randint(0, 13, (4,))) | kw


def _policy_head(**kw):
    x = torch.randn(2, 3)
    return dict(hidden=torch.randn(2, 3, 8), weight=torch.randn(13, 8), labels=torch.randint(0, 13, (2, 3)),
                old_logprobs=x, advantages=torch.randn(2, 3), mask=torch.rand(2, 3) < 0.7) | kw


# (id, op, keyword arguments, expected exception type, words the message must contain)
CASES = [
    ("ppo shape", rk.ppo_policy_loss, _ppo(old_logprobs=torch.randn(3, 7)), ValueError, "old_logprobs"),
    ("ppo 1-d", rk.ppo_policy_loss, _ppo(logprobs=torch.randn(8), old_logprobs=torch.randn(8),
                                         advantages=torch.randn(8), mask=torch.ones(8, dtype=torch.bool)),
     ValueError, "logprobs"),
    ("ppo int advantages", rk.ppo_policy_loss, _ppo(advantages=torch.ones(3, 8, dtype=torch.long)), TypeError,
     "advantages"),
    ("ppo float mask", rk.ppo_policy_loss, _ppo(mask=torch.ones(3, 8)), TypeError, "mask"),
    ("ppo mask shape", rk.ppo_policy_loss, _ppo(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "mask"),
    ("ppo mask list", rk.ppo_policy_loss, _ppo(mask=[[True] * 8] * 3), TypeError, "mask"),
    ("ppo logprobs list", rk.ppo_policy_loss, _ppo(logprobs=[[0.0] * 8] * 3), TypeError, "logprobs"),
    ("ppo loss_agg", rk.ppo_policy_loss, _ppo(loss_agg="seq-mean"), ValueError, "loss_agg"),
    ("ppo dual_clip", rk.ppo_policy_loss, _ppo(dual_clip=1.0), ValueError, "dual_clip"),
    ("ppo clip_low", rk.ppo_policy_loss, _ppo(clip_low=-0.1), ValueError, "clip_low"),
    ("ppo clip_high", rk.ppo_policy_loss, _ppo(clip_high=-0.1), ValueError, "clip_high"),
    ("ppo num_tokens 0", rk.ppo_policy_loss, _ppo(num_tokens=0), ValueError, "num_tokens"),
    ("ppo num_tokens str", rk.ppo_policy_loss, _ppo(num_tokens="12"), TypeError, "num_tokens"),
    ("ppo num_tokens shape", rk.ppo_policy_loss, _ppo(num_tokens=torch.ones(2)), ValueError, "num_tokens"),
    ("ppo is_correction without rollout", rk.ppo_policy_loss, _ppo(is_correction="tis"), ValueError,
     "rollout_logprobs"),
    ("ppo rollout without is_correction", rk.ppo_policy_loss, _ppo(rollout_logprobs=torch.randn(3, 8)), ValueError,
     "is_correction"),
    ("ppo is_level without is_correction", rk.ppo_policy_loss, _ppo(is_level="sequence"), ValueError, "is_level"),
    ("ppo is_cap without is_correction", rk.ppo_policy_loss, _ppo(is_cap=3.0), ValueError, "is_cap"),
    ("ppo dual_clip with cispo", rk.ppo_policy_loss, _ppo(objective="cispo", dual_clip=2.0), ValueError, "dual_clip"),
    ("ppo objective", rk.ppo_policy_loss, _ppo(objective="grpo"), ValueError, "objective"),
    ("ppo ratio_level", rk.ppo_policy_loss, _ppo(ratio_level="seq"), ValueError, "ratio_level"),
    ("ppo is_correction value", rk.ppo_policy_loss, _ppo(rollout_logprobs=torch.randn(3, 8), is_correction="is"),
     ValueError, "is_correction"),
    ("ppo is_level value", rk.ppo_policy_loss, _ppo(rollout_logprobs=torch.randn(3, 8), is_correction="tis",
                                                    is_level="row"), ValueError, "is_level"),
    ("ppo is_cap 1", rk.ppo_policy_loss, _ppo(rollout_logprobs=torch.randn(3, 8), is_correction="tis", is_cap=1.0),
     ValueError, "is_cap"),
    ("ppo is_cap inf", rk.ppo_policy_loss, _ppo(rollout_logprobs=torch.randn(3, 8), is_correction="mis",
                                                is_cap=float("inf")), ValueError, "is_cap"),
    ("ppo is_cap str", rk.ppo_policy_loss, _ppo(rollout_logprobs=torch.randn(3, 8), is_correction="tis", is_cap="2"),
     TypeError, "is_cap"),
    ("ppo rollout shape", rk.ppo_policy_loss, _ppo(rollout_logprobs=torch.randn(3, 7), is_correction="tis"),
     ValueError, "rollout_logprobs"),
    ("ppo rollout int", rk.ppo_policy_loss, _ppo(rollout_logprobs=torch.ones(3, 8, dtype=torch.long),
                                                 is_correction="tis"), TypeError, "rollout_logprobs"),
    ("value clip", rk.ppo_value_loss, _value(clip=0.0), ValueError, "clip"),
    ("value returns shape", rk.ppo_value_loss, _value(returns=torch.randn(2, 8)), ValueError, "returns"),
    ("value float mask", rk.ppo_value_loss, _value(mask=torch.ones(3, 8).double()), TypeError, "mask"),
    ("gae float mask", rk.gae, _gae(mask=torch.ones(2, 6)), TypeError, "mask"),
    ("gae gamma", rk.gae, _gae(gamma=1.5), ValueError, "gamma"),
    ("gae lam nan", rk.gae, _gae(lam=float("nan")), ValueError, "lam"),
    ("gae lam negative", rk.gae, _gae(lam=-0.5), ValueError, "lam"),
    ("gae 1-d", rk.gae, _gae(rewards=torch.randn(6), values=torch.randn(6), mask=torch.ones(6, dtype=torch.bool)),
     ValueError, "rewards"),
    ("gae int rewards", rk.gae, _gae(rewards=torch.ones(2, 6, dtype=torch.int32)), TypeError, "rewards"),
    ("gae last_values", rk.gae, _gae(last_values=torch.ones(3)), ValueError, "last_values"),
    ("packed decreasing", rk.gae_packed, _packed(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, "cu_seqlens"),
    ("packed end", rk.gae_packed, _packed(cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens"),
    ("packed float cu", rk.gae_packed, _packed(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
    ("packed gamma", rk.gae_packed, _packed(gamma=-0.1), ValueError, "gamma"),
    ("whiten shape", rk.masked_whiten, dict(x=torch.randn(3, 2), mask=torch.ones(2, 3, dtype=torch.bool)),
     ValueError, "mask"),
    ("whiten float mask", rk.masked_whiten, dict(x=torch.randn(3), mask=torch.ones(3)), TypeError, "mask"),
    ("bt shape", rk.bt_loss, _bt(rejected=torch.randn(4)), ValueError, "rejected"),
    ("bt label_smoothing", rk.bt_loss, _bt(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("bt center_coef", rk.bt_loss, _bt(center_coef=-1.0), ValueError, "center_coef"),
    ("bt int rejected", rk.bt_loss, _bt(rejected=torch.ones(5, dtype=torch.long)), TypeError, "rejected"),
    ("bt margin shape", rk.bt_loss, _bt(margin=torch.randn(3)), ValueError, "margin"),
    ("score shape", rk.score_loss, _score(score=torch.tensor([0, 1, 2])), ValueError, "score"),
    ("score 2-d pred", rk.score_loss, _score(pred=torch.randn(5, 1)), ValueError, "pred"),
    ("score int pred", rk.score_loss, _score(pred=torch.ones(5, dtype=torch.long)), TypeError, "pred"),
    ("score float levels", rk.score_loss, _score(score=torch.randn(5)), TypeError, "score"),
    ("score level range", rk.score_loss, _score(score=torch.tensor([0, 1, 4, 3, 1])), ValueError, "score"),
    ("score negative level", rk.score_loss, _score(score=torch.tensor([0, -1, 2, 3, 1])), ValueError, "score"),
    ("score no thresholds", rk.score_loss, _score(thresholds=None), ValueError, "thresholds"),
    ("score thresholds order", rk.score_loss, _score(thresholds=torch.tensor([-1.0, 1.0, 0.0])), ValueError,
     "thresholds"),
    ("score thresholds tie", rk.score_loss, _score(thresholds=torch.tensor([-1.0, 0.0, 0.0])), ValueError,
     "thresholds"),
    ("score thresholds nan", rk.score_loss, _score(thresholds=torch.tensor([-1.0, math.nan, 1.0])), ValueError,
     "thresholds"),
    ("score thresholds 2-d", rk.score_loss, _score(thresholds=torch.randn(3, 1)), ValueError, "thresholds"),
    ("score int thresholds", rk.score_loss, _score(thresholds=torch.tensor([-1, 0, 1])), TypeError, "thresholds"),
    ("score kind", rk.score_loss, _score(kind="likert"), ValueError, "kind"),
    ("score regression int target", rk.score_loss, dict(pred=torch.randn(5), score=torch.ones(5, dtype=torch.long)),
     TypeError, "score"),
    ("score regression thresholds", rk.score_loss, _score(kind="regression", score=torch.randn(5)), ValueError,
     "thresholds"),
    ("ranking 1-d", rk.ranking_loss, dict(rewards=torch.randn(5)), ValueError, "rewards"),
    ("ranking valid shape", rk.ranking_loss, dict(rewards=torch.randn(3, 4), valid=torch.ones(3, 5, dtype=torch.bool)),
     ValueError, "valid"),
    ("ranking float valid", rk.ranking_loss, dict(rewards=torch.randn(3, 4), valid=torch.ones(3, 4)), TypeError,
     "valid"),
    ("logprobs label range", rk.token_logprobs, _logits(labels=torch.full((2, 3), 11)), ValueError, "labels"),
    ("logprobs negative label", rk.token_logprobs, _logits(labels=torch.full((2, 3), -3)), ValueError, "labels"),
    ("logprobs labels shape", rk.token_logprobs, _logits(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError,
     "labels"),
    ("logprobs float labels", rk.token_logprobs, _logits(labels=torch.zeros(2, 3)), TypeError, "labels"),
    ("logprobs V=0", rk.token_logprobs, _logits(logits=torch.randn(2, 3, 0)), ValueError, "logits"),
    ("logprobs temperature", rk.token_logprobs, _logits(temperature=0.0), ValueError, "temperature"),
    ("entropy temperature", rk.token_entropy, dict(logits=torch.randn(2, 5), temperature=-1.0), ValueError,
     "temperature"),
    ("full_kl shape", rk.full_kl, dict(logits=torch.randn(2, 5), ref_logits=torch.randn(2, 6)), ValueError,
     "ref_logits"),
    ("full_kl dtype", rk.full_kl, dict(logits=torch.randn(2, 5), ref_logits=torch.randn(2, 5).half()), TypeError,
     "ref_logits"),
    ("kl_penalty kind", rk.kl_penalty, dict(logprobs=torch.randn(4), ref_logprobs=torch.randn(4), kind="k4"),
     ValueError, "kind"),
    ("kl_penalty shape", rk.kl_penalty, dict(logprobs=torch.randn(4), ref_logprobs=torch.randn(5)), ValueError,
     "ref_logprobs"),
    ("linear H", rk.linear_token_logprobs, _linear(weight=torch.randn(13, 7)), ValueError, "weight"),
    ("linear label range", rk.linear_token_logprobs, _linear(labels=torch.full((4,), 13)), ValueError, "labels"),
    ("linear bias shape", rk.linear_token_logprobs, _linear(bias=torch.randn(12)), ValueError, "bias"),
    ("linear dtype", rk.linear_token_logprobs, _linear(weight=torch.randn(13, 8).half()), TypeError, "weight"),
    ("policy head 2-d hidden", rk.linear_policy_loss, _policy_head(hidden=torch.randn(6, 8)), ValueError, "hidden"),
    ("policy head dtypes", rk.linear_policy_loss, _policy_head(weight=torch.randn(13, 8).half()), TypeError,
     "weight"),
    ("policy head label range", rk.linear_policy_loss, _policy_head(labels=torch.full((2, 3), 13),
                                                                    mask=torch.ones(2, 3, dtype=torch.bool)),
     ValueError, "labels"),
    ("policy head mask shape", rk.linear_policy_loss, _policy_head(mask=torch.ones(2, 4, dtype=torch.bool)),
     ValueError, "mask"),
    ("policy head advantages shape", rk.linear_policy_loss, _policy_head(advantages=torch.randn(3, 2)), ValueError,
     "advantages"),
    ("policy head kl_kind", rk.linear_policy_loss, _policy_head(ref_logprobs=torch.randn(2, 3), kl_coef=0.1,
                                                                kl_kind="k5"), ValueError, "kl_kind"),
    ("policy head kl_coef", rk.linear_policy_loss, _policy_head(ref_logprobs=torch.randn(2, 3), kl_coef=-1.0),
     ValueError, "kl_coef"),
    ("policy head entropy_coef", rk.linear_policy_loss, _policy_head(entropy_coef=-0.1), ValueError, "entropy_coef"),
    ("policy head ref without coef", rk.linear_policy_loss, _policy_head(ref_logprobs=torch.randn(2, 3)), ValueError,
     "ref_logprobs"),
    ("policy head rollout shape", rk.linear_policy_loss, _policy_head(rollout_logprobs=torch.randn(2, 2),
                                                                      is_correction="tis"), ValueError,
     "rollout_logprobs"),
    ("policy head cispo dual", rk.linear_policy_loss, _policy_head(objective="cispo", dual_clip=2.0), ValueError,
     "dual_clip"),
    ("group size divides", rk.group_advantages, dict(rewards=torch.randn(6), group_size=4), ValueError, "group_size"),
    ("group size float", rk.group_advantages, dict(rewards=torch.randn(6), group_size=3.0), TypeError, "group_size"),
    ("group neither", rk.group_advantages, dict(rewards=torch.randn(6)), ValueError, "group_size"),
    ("group both", rk.group_advantages, dict(rewards=torch.randn(6), group_index=torch.zeros(6, dtype=torch.long),
                                             group_size=3), ValueError, "group_index"),
    ("group index float", rk.group_advantages, dict(rewards=torch.randn(6), group_index=torch.zeros(6)), TypeError,
     "group_index"),
    ("group index length", rk.group_advantages,
     dict(rewards=torch.randn(6), group_index=torch.zeros(4, dtype=torch.int)), ValueError, "group_index"),
    ("group mode", rk.group_advantages, dict(rewards=torch.randn(6), group_size=3, mode="gspo"), ValueError, "mode"),
    ("group 2-d rewards", rk.group_advantages, dict(rewards=torch.randn(2, 3), group_size=1), ValueError, "rewards"),
    ("group int rewards", rk.group_advantages, dict(rewards=torch.ones(6, dtype=torch.int), group_size=3), TypeError,
     "rewards"),
    ("group mask shape", rk.group_advantages, dict(rewards=torch.randn(6), group_size=3,
                                                   mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "mask"),
    ("group float mask", rk.group_advantages, dict(rewards=torch.randn(6), group_size=3, mask=torch.ones(6, 4)),
     TypeError, "mask"),
    ("group eps rloo", rk.group_advantages, dict(rewards=torch.randn(6), group_size=3, mode="rloo", eps=0.1),
     ValueError, "eps"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_exception_on_every_backend(case, backend):
    _, op, kwargs, kind, words = case
    with pytest.raises(kind) as info:
        op(**kwargs, backend=backend)
    assert words in str(info.value), str(info.value)
    assert not isinstance(info.value, rk.BackendUnavailable)
