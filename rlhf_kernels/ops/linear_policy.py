"""The policy head: hidden states straight to the policy objective (PPO, GSPO, CISPO).

    logp, H = linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=T)
    loss    = ppo_policy_loss(logp, old_logprobs, advantages, mask, ...)
              - entropy_coef * agg(H) + kl_coef * agg(kl_penalty(logp, ref_logprobs, kl_kind))

where agg aggregates over the valid tokens (mask true) with the policy loss's ``loss_agg`` and
``num_tokens``, without ever holding the [B, T, V] logits, and with the gradients made in the
forward: the tokens are walked in chunks whose [rows, V] float32 logits fit one buffer (one
matmul each, all of V); each row's softmax statistics give logp and H, hence the token's loss
terms and, since each row's weight in the loss is known before the loop (from the mask, and
for a rollout correction from old_logprobs and rollout_logprobs), its d loss / d logits,
written in place over the logits; two more matmuls per chunk give the rows'
d_hidden and the chunk's share of d_weight. 6NHV FLOPs for the whole training step (2NHV
forward, 4NHV gradients, nothing recomputed), against 8NHV for linear_token_logprobs followed by
the losses (which recomputes the logits in its backward). The backward only multiplies the
stored gradients, in place, by the upstream gradient. Without gradients (no input requires one,
or grad mode is off) it is one 2NHV pass. The sequence-level ratio (GSPO) is the exception: a
token's gradient needs its row's ratio, hence every logp of the row, so with gradients it takes
two passes: one without gradients for logp (2NHV), then the one above (6NHV): 8NHV.
With ``process_group`` (the vocabulary split across ranks, docs/tensor_parallel.md) a token's
gradient needs the global statistics of its row, known only after the collective: a statistics
pass, one all-gather, then the gradient pass in the backward, 8NHV/TP per rank for every option
(``_vocab_parallel``).

Backends: ``cpu`` and ``cuda`` (native: checks, chunks and autograd in C++,
csrc/include/rlhf/linear_policy_op.h and csrc/autograd/derivatives.cpp; the PPO part is
ppo_policy_options_fwd's own kernel on the [B, T] logp; one dispatcher call from here), ``triton``
(torch matmuls, one Triton epilogue per chunk, the PPO part from triton/ppo.py), ``torch``
(chunked eager: linear_token_logprobs' torch backend, then the loss terms in float64).
Labels at masked positions are never read. A label outside [0, V) at a valid position raises
when ``validate`` is true (one host sync on a GPU; skipped by ``validate=False``, CUDA graph
capture and torch.compile graphs on a GPU; then that token's logp and entropy are NaN, so is
the loss, and its row of logits gets no gradient).
"""

import math

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._layout import LINEAR_POLICY_STATS, POLICY_STATS
from rlhf_kernels._signatures import f32, grads_like, shape
from rlhf_kernels._stats import Stats
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.ops.linear_logprobs import _check as _check_linear
from rlhf_kernels.ops.linear_logprobs import linear_token_logprobs
from rlhf_kernels.ops.logprobs import KERNEL_DTYPES, KL_KINDS, _check_temperature
from rlhf_kernels.ops.ppo import (_check_clips, _check_policy_options, _loss_agg_code, _policy_options,
                                  ppo_policy_loss)
from rlhf_kernels.reference import linear_policy as ref
from rlhf_kernels.reference import logprobs as ref_lp
from rlhf_kernels.reference import ppo as ref_ppo

# Float32 logits elements per chunk; 0 lets each backend choose (32 MiB of them on the CPU;
# on a GPU the logits, their 16-bit gradient and a float32 d_weight accumulator fit 1 GiB).
# Tests set it small to exercise the chunking (at least one row of V per chunk).
_TILE = 0
NATIVE = _backend.NATIVE
if _ext.loaded():
    _linear_policy_fwd = torch.ops.rlhf_kernels.linear_policy_fwd.default


class PolicyHeadStats(Stats):
    """``Stats`` of linear_policy_loss: the 0-d statistics over ``packed`` (LINEAR_POLICY_STATS),
    plus ``"logprobs"``, the per-token log-probabilities [B, T] (float32, detached, 0 where
    masked), which is not in ``packed``: all-reduce or log ``packed``, read ``logprobs`` apart."""

    __slots__ = ("logprobs",)

    def __init__(self, packed, logprobs):
        super().__init__(LINEAR_POLICY_STATS, packed)
        self.logprobs = logprobs

    def _all(self):
        if self._views is None:
            self._views = dict(zip(self.names, self.packed.unbind(0)))
            self._views["logprobs"] = self.logprobs
        return self._views

    def __iter__(self):
        yield from self.names
        yield "logprobs"

    def __len__(self):
        return len(self.names) + 1

    def __contains__(self, name):
        return name == "logprobs" or name in self.names

    def __repr__(self):
        return "PolicyHeadStats(%s, logprobs=%s)" % (
            ", ".join("%s=%s" % (k, x) for k, x in zip(self.names, self.packed.tolist())),
            "tensor(shape=%s)" % list(self.logprobs.shape))


def _stats(packed, logprobs):
    if torch.compiler.is_compiling():  # a plain dict of views while torch.compile traces (as _stats.stats)
        d = dict(zip(LINEAR_POLICY_STATS, packed.unbind(0)))
        d["logprobs"] = logprobs
        return d
    return PolicyHeadStats(packed, logprobs)


def _check_row_input(op, name, t, hidden, kind="float"):
    v.tensor(op, name, t, kind=kind)
    if list(t.shape) != list(hidden.shape[:-1]):
        raise ValueError("%s: `%s` must have shape %s (hidden's shape %s without H), got %s"
                         % (op, name, list(hidden.shape[:-1]), list(hidden.shape), list(t.shape)))
    v.same_device(op, "hidden", hidden, **{name: t})


def _coef(op, name, x):
    x = v.number(op, name, x, lo=0.0)
    if math.isinf(x):
        raise ValueError("%s: `%s` must be a finite number >= 0, got %r" % (op, name, x))
    return x


def _check_labels_where_valid(op, labels, mask, V):
    """``validate``: labels where mask is set must be in [0, V) (one host sync on a GPU)."""
    if labels.numel() == 0 or (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    bad = ((labels < 0) | (labels >= V)) & mask
    if bool(bad.any()):
        b, t = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError("%s: `labels` must be in [0, V) = [0, %d) where `mask` is set, but labels[%d, %d] = %d "
                         "(labels where `mask` is 0 are never read)" % (op, V, b, t, int(labels[b, t])))


def _check_python(op, hidden, weight, labels, old_logprobs, advantages, mask, bias, temperature, ref_logprobs,
                  kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip, num_tokens, objective,
                  rollout_logprobs, is_correction, is_level, is_cap, validate, shards=1):
    """The Python paths' checks (what the native ops check in C++); the labels index a vocabulary
    of ``shards`` times weight's rows (the whole one under a process group). Returns the
    converted arguments."""
    v.tensor(op, "hidden", hidden, kind="float")
    if hidden.dim() != 3:
        raise ValueError("%s: `hidden` must have 3 dimension(s) ([B, T, H]), got shape %s" % (op, list(hidden.shape)))
    _check_linear(op, hidden, weight, labels, bias)
    _check_row_input(op, "old_logprobs", old_logprobs, hidden)
    _check_row_input(op, "advantages", advantages, hidden)
    _check_row_input(op, "mask", mask, hidden, kind="mask")
    if ref_logprobs is not None:
        _check_row_input(op, "ref_logprobs", ref_logprobs, hidden)
    if rollout_logprobs is not None:
        _check_row_input(op, "rollout_logprobs", rollout_logprobs, hidden)
    if not isinstance(kl_kind, str):
        raise TypeError("%s: `kl_kind` must be a string, got %r" % (op, kl_kind))
    v.choice(op, "kl_kind", kl_kind, KL_KINDS, quote=True)
    kl_coef, entropy_coef = _coef(op, "kl_coef", kl_coef), _coef(op, "entropy_coef", entropy_coef)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("%s: `kl_coef` = %r needs `ref_logprobs` (the reference policy's log-probabilities of the "
                         "labels)" % (op, kl_coef))
    if kl_coef == 0 and ref_logprobs is not None:
        raise ValueError("%s: `ref_logprobs` given with `kl_coef` = 0; it would be ignored (pass kl_coef > 0, or no "
                         "ref_logprobs)" % op)
    clip_low, clip_high, dual_clip = _check_clips(op, clip_low, clip_high, dual_clip)
    roll, cap = _check_policy_options(op, rollout_logprobs, is_correction, is_level, is_cap, dual_clip, objective,
                                      old_logprobs)
    nt = v.num_tokens(op, num_tokens, hidden.device)
    temperature = _check_temperature(op, temperature)
    m = v.as_mask(mask)
    if validate and not torch.compiler.is_compiling():
        _check_labels_where_valid(op, labels, m, weight.shape[0] * shards)
    olp, adv = v.as_f32(old_logprobs.detach()), v.as_f32(advantages.detach())
    rlp = None if ref_logprobs is None else v.as_f32(ref_logprobs.detach())
    return (m, olp, adv, rlp, roll, cap, nt, temperature, clip_low, clip_high, dual_clip, kl_coef, entropy_coef)


def _group_size(op, process_group, weight):
    """The number of ranks the vocabulary is split over: 1 for no group or a group of one."""
    from rlhf_kernels.ops import _vocab_parallel as vp  # torch.distributed only for a group
    shard = vp.vocab_shard(op, process_group, weight.shape[0] if isinstance(weight, torch.Tensor) else 0)
    return 1 if shard is None else shard.world


def _vocab_parallel(op, name, hidden, weight, labels, old_logprobs, advantages, mask, bias, temperature,
                    ref_logprobs, kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip, loss_agg, num_tokens,
                    ratio_level, objective, rollout_logprobs, is_correction, is_level, is_cap, validate, process_group,
                    shards):
    """linear_policy_loss over a vocabulary split across ``process_group`` (``shards`` ranks).

    A token's gradient needs its row's global softmax statistics, and under GSPO its sequence's
    ratio, hence every logp of the sequence: neither is known until the ranks have combined
    their shards. So the single-device trick (gradients made in the forward, 6NHV) would need
    either the [N, V_local] logits kept until then or one collective per chunk. Instead:
      1. statistics pass: linear_token_logprobs(process_group=...) on the local shard, its one
         collective of O(N) float32 values and the combine (ops/_vocab_parallel.py): the
         global logp and entropy [B, T], the same on every rank (2NHV/TP FLOPs); it saves
         only per-row statistics, never [N, V_local];
      2. the loss on [B, T] on every rank (ppo_policy_loss on the same backend, the entropy
         and KL terms in float64 with the same aggregation): no collective;
      3. gradient pass (the backward): linear_token_logprobs' backward, from the saved global
         statistics, recomputes the local logits and gives d_hidden (partial) and the local
         d_weight and d_bias: 6NHV/TP FLOPs, no collective.
    8NHV/TP in all (6NHV/TP when only hidden or only weight needs a gradient, 2NHV/TP without
    gradients), the cost of the single-device op's GSPO path divided by TP, for every loss_agg
    and option. Labels at masked positions are never read (replaced by an ignore_index)."""
    (m, olp, adv, rlp, _, _, nt, temperature, clip_low, clip_high, dual_clip, kl_coef,
     entropy_coef) = _check_python(op, hidden, weight, labels, old_logprobs, advantages, mask, bias, temperature,
                                   ref_logprobs, kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip,
                                   num_tokens, objective, rollout_logprobs, is_correction, is_level, is_cap,
                                   validate, shards)
    y = ref._masked_labels(labels, m)
    logp, entropy = linear_token_logprobs(hidden, weight, y, bias=bias, temperature=temperature,
                                          ignore_index=ref._MASKED, return_entropy=True, validate=False,
                                          process_group=process_group, backend=name)
    loss, pstats = ppo_policy_loss(logp, olp, adv, m, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                                   loss_agg=loss_agg, num_tokens=num_tokens, ratio_level=ratio_level,
                                   objective=objective, rollout_logprobs=rollout_logprobs,
                                   is_correction=is_correction, is_level=is_level, is_cap=is_cap, backend=name)
    lp64, ent64 = logp.double(), entropy.double()
    count = m.sum(dtype=torch.float64)
    loss = loss.double()
    if entropy_coef != 0:
        loss = loss - entropy_coef * ref_ppo.aggregate(ent64, m, loss_agg, nt)
    kl = torch.zeros_like(lp64)
    if rlp is not None:
        kl = ref_lp.kl_penalty(lp64, rlp.double(), kl_kind)
        loss = loss + kl_coef * ref_ppo.aggregate(kl, m, loss_agg, nt)
    means = torch.stack((ref_ppo._masked_mean(ent64.detach(), m, count), ref_ppo._masked_mean(kl.detach(), m, count)))
    packed = torch.stack([pstats[k] for k in POLICY_STATS] + list(means.float().unbind(0)))
    return loss.float(), _stats(packed, logp.detach())


def linear_policy_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, bias=None, temperature=1.0,
                       ref_logprobs=None, kl_coef=0.0, kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None,
                       dual_clip=None, loss_agg="token-mean", num_tokens=None, ratio_level="token", objective="ppo",
                       rollout_logprobs=None, is_correction=None, is_level=None, is_cap=None, validate=True,
                       process_group=None, backend="auto"):
    """PPO (or GSPO, CISPO) policy loss, entropy bonus and KL penalty straight from the hidden
    states and the LM head, with the gradients made in the forward.

    loss = ppo_policy_loss(logp, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                           loss_agg, num_tokens, ratio_level, objective, rollout_logprobs,
                           is_correction, is_level, is_cap)
           - entropy_coef * agg(H) + kl_coef * agg(kl_penalty(logp, ref_logprobs, kl_kind))
    with logp, H = linear_token_logprobs(hidden, weight, labels, bias, temperature) and agg the
    policy loss's aggregation (same loss_agg, num_tokens and valid tokens).

    Args:
        hidden: [B, T, H] float32, float16 or bfloat16 (the LM head's input); any strides.
        weight: [V, H] the LM head's weight, hidden's dtype and device.
        labels: [B, T] integers (the sampled tokens); read only where ``mask`` is set.
        old_logprobs, advantages: [B, T] float (constants).
        mask: [B, T] bool or integer (nonzero = the token counts). Float masks are refused.
        bias: [V] or None, hidden's dtype.
        temperature: > 0, applied to the logits.
        ref_logprobs: [B, T] float, the reference policy's log-probabilities (a constant); given
            exactly when kl_coef > 0 (given with kl_coef = 0 it would be ignored: refused).
        kl_coef, entropy_coef: finite numbers >= 0.
        kl_kind: "k1", "k2", "k3" or "abs" (kl_penalty's estimators of logp - ref_logprobs).
        clip_low, clip_high, dual_clip, loss_agg, num_tokens, ratio_level, objective,
            rollout_logprobs, is_correction, is_level, is_cap: as in ``ppo_policy_loss``.
            rollout_logprobs is [B, T] float (a constant). ratio_level "sequence" (GSPO) costs a
            second pass over the LM head when gradients are made: each token's gradient needs its
            row's sequence ratio, so every logp first (2NHV), then the gradient pass (6NHV): 8NHV,
            as linear_token_logprobs followed by the loss; every other option keeps 6NHV.
        validate: raise a ValueError for a label outside [0, V) where mask is set. On a GPU the
            check reads the labels back: one host sync per call; it is skipped while a CUDA
            graph is captured and in torch.compile graphs on a GPU. Without it such a label
            gives NaN logp and entropy (and loss) and no gradient to its row of logits.
        process_group: None, or the tensor-parallel group over which the vocabulary is split
            (docs/tensor_parallel.md): weight [V_local, H] and bias [V_local] are this rank's
            rows [r * V_local, (r + 1) * V_local) of the LM head (rank r in the group's order,
            equal slices), labels are global ids in [0, V_local * world). The loss and every
            stat are the whole vocabulary's, bitwise the same on every rank; d_weight and d_bias
            are this rank's slice of the whole gradient; d_hidden is this rank's partial sum
            (the caller all-reduces it, as for any column-parallel linear layer). One
            collective of O(B*T) float32 values in the forward, none in the backward; 8NHV/TP
            FLOPs with gradients (see _vocab_parallel). A group of one is the same as None.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (loss, stats): loss a 0-d float32 tensor, differentiable wrt hidden, weight and bias
        (gradients in their dtype); stats a read-only mapping (``PolicyHeadStats``) of
        ppo_policy_loss's statistics (as it computes them from logp), ``entropy`` and ``kl``
        (means over valid tokens; kl is 0 without ref_logprobs) as 0-d float32 tensors, all in
        ``stats.packed`` (names: LINEAR_POLICY_STATS), and ``stats["logprobs"]``: logp [B, T]
        float32, detached, 0 where masked (not in ``packed``).

    A backward runs once per call: the gradients are made by the forward and handed over (a
    second backward through one call, with retain_graph=True, raises).
    """
    op = "linear_policy_loss"
    name = _backend.pick_kernel(op, backend, hidden, "hidden", KERNEL_DTYPES)
    agg = _loss_agg_code(op, loss_agg)
    plain = (rollout_logprobs is None and is_correction is None and is_level is None and is_cap is None
             and ratio_level == "token" and objective == "ppo")
    options = 0 if plain else _policy_options(op, ratio_level, objective, is_correction, is_level)
    if torch.compiler.is_compiling():
        validate = validate and not hidden.is_cuda  # no host sync inside a compiled graph
    shards = 1 if process_group is None else _group_size(op, process_group, weight)
    if shards > 1:
        return _vocab_parallel(op, name, hidden, weight, labels, old_logprobs, advantages, mask, bias, temperature,
                               ref_logprobs, kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip,
                               loss_agg, num_tokens, ratio_level, objective, rollout_logprobs, is_correction, is_level,
                               is_cap, validate, process_group, shards)
    if name in NATIVE:
        nt, nt_value = v.num_tokens_args(op, num_tokens)
        try:
            loss, packed, logp = _linear_policy_fwd(hidden, weight, bias, labels, old_logprobs, advantages, mask,
                                                    ref_logprobs, nt, nt_value, temperature, kl_coef, kl_kind,
                                                    entropy_coef, clip_low, clip_high, dual_clip, agg,
                                                    rollout_logprobs, options, is_cap, _TILE, validate)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return loss, _stats(packed, logp)

    # the torch and triton backends check here what the native ops check in C++
    (m, olp, adv, rlp, roll, cap, nt, temperature, clip_low, clip_high, dual_clip, kl_coef,
     entropy_coef) = _check_python(op, hidden, weight, labels, old_logprobs, advantages, mask, bias, temperature,
                                   ref_logprobs, kl_coef, kl_kind, entropy_coef, clip_low, clip_high, dual_clip,
                                   num_tokens, objective, rollout_logprobs, is_correction, is_level, is_cap,
                                   validate)
    if name == "torch":
        kw = {} if plain else dict(ratio_level=ratio_level, objective=objective, is_correction=is_correction,
                                   rollout_logprobs=roll, is_level=is_level or "token", is_cap=cap)
        loss, stats, logp = ref.chunked_linear_policy_loss(hidden, weight, labels, olp, adv, m, bias, temperature, rlp,
                                                           kl_coef, kl_kind, entropy_coef, clip_low, clip_high,
                                                           dual_clip, loss_agg, nt, **kw)
        return loss.float(), _stats(torch.stack([stats[k] for k in LINEAR_POLICY_STATS]).float(), logp)
    from rlhf_kernels.triton import linear_policy as tri
    B, T, H = hidden.shape
    grad = torch.is_grad_enabled()
    need = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    y = labels.reshape(-1)
    if y.dtype not in (torch.int32, torch.int64):
        y = y.long()
    loss, packed, logp, *_ = tri.linear_policy(
        hidden.reshape(B * T, H).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        y.contiguous(), olp, adv, m, rlp, nt, temperature, kl_coef, kl_kind, entropy_coef, clip_low, clip_high,
        dual_clip, agg, roll, options, cap, _TILE, *need)
    return loss, _stats(packed, logp)


# ---- output shapes of the native ops and their Triton twins (rlhf_kernels/_signatures.py) ----

@shape("linear_policy_fwd")
def _linear_policy_shapes(hidden, mask, **_):
    # logprobs shaped as mask [B, T]: the native op takes hidden [B, T, H], the Triton one [B*T, H]
    return f32(hidden, ()), f32(hidden, (len(LINEAR_POLICY_STATS),)), f32(hidden, mask.shape)


@shape("linear_policy_fwd_grad")
def _linear_policy_grad_shapes(hidden, weight, mask, need_hidden, need_weight, need_bias, **_):
    return _linear_policy_shapes(hidden, mask) + grads_like(hidden, weight, need_hidden, need_weight, need_bias)
