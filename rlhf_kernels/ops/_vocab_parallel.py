"""Vocabulary parallelism: the convention, the one collective and the combine, written once.

The convention (Megatron's). With a ``process_group`` of W ranks:
  * The last axis of the logits, and the rows of an LM head's weight and bias, are this rank's
    contiguous slice of the vocabulary. Slices are equal and in the group's rank order: rank r
    holds ids [r * V_local, (r + 1) * V_local), V_global = W * V_local.
  * Labels are global ids, the same on every rank; ``ignore_index`` as without a group.
  * Outputs are the full-vocabulary values, bitwise the same on every rank.
  * Gradients wrt the local logits, weight or bias are that slice of the full gradient;
    d_hidden is this rank's partial sum (the caller reduces it, as for any column-parallel
    linear layer).

How an op uses this module (the logits ops and linear_token_logprobs do exactly this; a fused
head such as the policy loss does the same around its own kernels):

  forward
    1. ``shard = vocab_shard(op, group, V_local)``; None means no group or a group of one: run the
       single-device op unchanged.
    2. ``lab = localize_labels(labels, shard, ignore_index)``: ``lab.local`` is each row's label as
       a local column, always in [0, V_local) (0 where this rank does not own the label, or the row
       is ignored), so the local kernel can run with ignore_index = -1 and never skips a row.
    3. Run the single-device kernel on the local slice: per row, float32 (m, log d) (the max and
       log of the sum of exps of s = z / T), the entropy H_r of the local softmax, and the local
       log-prob of ``lab.local`` (only meaningful on the owner).
    4. ``g = gather_rows(torch.stack([m, log_d, H_r, logp_r], 1), shard)``: the ONE collective of
       the forward, an all-gather of N * K float32 values per rank -> [W, N, K].
    5. ``combine_softmax(g[..., 0], g[..., 1], g[..., 2])`` -> global (M, log D), entropy and
       log pi_r = lse_r - lse; ``owner_logprob(g[..., 3], log_pi, lab)`` -> the label's global
       log-prob. Everything is computed in float64 from the gathered values in the same way on every
       rank, so the results are bitwise the same everywhere. Save (M, log D) as the [N, 2]
       statistics and the global entropy (no [N, V_local] tensor).
  backward (no collective)
    6. Run the single-device backward kernel on the local slice with the saved GLOBAL statistics
       and entropy: it computes p_j = exp((s_j - M) - log D), the global softmax restricted to the
       slice, hence dz = [g_l (onehot(y) - p) - g_H p (log p + H)] / T for this slice. The
       one-hot term belongs to the owner only: either run the kernel without labels and add it with
       ``add_label_onehot`` (logits ops), or give the kernel ``lab.sink`` labels and a weight and
       bias extended by ``sink_head`` (fused heads, where the one-hot term passes through matmuls):
       the sink is one extra vocabulary row of zeros with bias -inf, so p = 0 there and the one-hot
       of a row owned elsewhere lands on a column whose weight is 0.
    Rows with ``lab.valid`` false (ignored, or a label outside [0, V_global) under
    ``validate=False``) get zero upstream gradients, so a zero gradient row.

Full KL (two softmaxes over the same slice) gathers (m, log d, m_r, log d_r, KL_r) and uses
``combine_kl``.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist


class VocabShard(NamedTuple):
    group: object       # the torch.distributed process group
    rank: int           # this rank's index in the group
    world: int          # W, the group's size
    v_local: int        # V_local, this rank's slice of the vocabulary
    offset: int         # rank * V_local, the first global id of the slice

    @property
    def v_global(self):
        return self.world * self.v_local


def vocab_shard(op, group, v_local) -> Optional[VocabShard]:
    """The shard of ``group`` (None when ``group`` is None or has one rank: the caller then runs the
    single-device op, which gives the same results)."""
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("%s: `process_group` was given but torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first, or pass process_group=None" % op)
    try:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise TypeError("%s: `process_group` must be a torch.distributed ProcessGroup that contains this "
                        "rank, got %r (%s)" % (op, group, e)) from None
    if rank < 0:
        raise ValueError("%s: this process is not a member of `process_group` (rank %d)" % (op, rank))
    if world == 1:
        return None
    return VocabShard(group, rank, world, int(v_local), rank * int(v_local))


class LocalLabels(NamedTuple):
    local: torch.Tensor     # [N] int64 in [0, V_local): the label's local column, 0 where not owned
    sink: torch.Tensor      # [N] int64: local column if owned, V_local (the sink) if owned elsewhere,
                            # -1 if not valid (ignored or out of range: the kernels skip the row)
    owner: torch.Tensor     # [N] int64 in [0, W): the rank that owns the label (0 where not valid)
    mine: torch.Tensor      # [N] bool: valid and owned by this rank
    valid: torch.Tensor     # [N] bool: not ignore_index and in [0, V_global)
    ignored: torch.Tensor   # [N] bool: equal to ignore_index


def localize_labels(labels, shard, ignore_index):
    """Global labels [N] (any integer dtype) -> LocalLabels of this shard. No host sync."""
    y = labels.reshape(-1).long()
    ignored = y == ignore_index
    valid = ~ignored & (y >= 0) & (y < shard.v_global)
    owner = torch.where(valid, torch.div(y, shard.v_local, rounding_mode="floor"), 0)
    mine = valid & (owner == shard.rank)
    local = torch.where(mine, y - shard.offset, 0)
    sink = torch.where(mine, local, torch.where(valid, shard.v_local, -1))
    return LocalLabels(local, sink, owner, mine, valid, ignored)


def gather_rows(parts, shard):
    """parts [N, K] float32 of this rank -> [W, N, K], every rank's rows in rank order.

    The one collective of a forward: an all-gather of N * K float32 values per rank
    (torch.distributed.all_gather_single, or all_gather_into_tensor on an older torch). Not
    differentiable: nothing flows back through it."""
    parts = parts.contiguous()
    out = parts.new_empty((shard.world * parts.shape[0],) + tuple(parts.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name
    gather(out, parts, group=shard.group)
    return out.view((shard.world,) + tuple(parts.shape))


def _log_weights(m, log_d):
    """[W, N] float64 per-shard (m, log d) -> (lse [N], log pi [W, N]), pi_r = exp(lse_r - lse)."""
    lse_r = m + log_d                       # -inf for a shard of only -inf logits
    top = lse_r.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all -inf / NaN rows: no shift
    lse = top + torch.log(torch.exp(lse_r - top).sum(0))
    return lse, lse_r - lse


def combine_softmax(m, log_d, entropy):
    """Gathered [W, N] float32 per-shard (m, log d, local entropy) -> global float32
    (stats [N, 2] = (M, log D) for the backward kernels, entropy [N]) and float64 log pi [W, N].

    H = sum_r pi_r (H_r - log pi_r): the entropy of a mixture of disjoint supports, with no
    cancellation. A shard whose logits are all -inf has pi_r = 0 and adds nothing."""
    m64, ld64, h64 = m.double(), log_d.double(), entropy.double()
    lse, log_pi = _log_weights(m64, ld64)
    pi = torch.exp(log_pi)
    h = torch.where(pi > 0, pi * (h64 - log_pi), torch.zeros_like(pi)).sum(0)
    h = torch.where(torch.isnan(lse), lse, h)  # a NaN row stays NaN
    big_m = m64.amax(0)
    stats = torch.stack((big_m, lse - big_m), 1).float()
    return stats, h.float(), log_pi


def owner_logprob(logp_local, log_pi, lab):
    """Gathered local log-probs [W, N] (each rank's log-prob of its ``lab.local``) -> the label's
    global log-prob [N] float32: the owner's local log-prob plus its log pi. 0 where ignored, NaN
    where the label is outside [0, V_global) (as the single-device ops give with validate=False)."""
    idx = lab.owner.view(1, -1)
    lp = logp_local.double().gather(0, idx)[0] + log_pi.gather(0, idx)[0]
    lp = torch.where(lab.valid, lp, torch.where(lab.ignored, 0.0, math.nan))
    return lp.float()


def mask_rows(x, lab):
    """A per-row output [N] float32: 0 where ignored, NaN where out of range, else x."""
    return torch.where(lab.valid, x, torch.where(lab.ignored, 0.0, math.nan)).float()


def combine_kl(m, log_d, m_ref, log_d_ref, kl):
    """Gathered [W, N] float32 per-shard (m, log d, m_ref, log d_ref, KL_r of the local softmaxes)
    -> global float32 (stats [N, 4] = (M, log D, M_ref, log D_ref), KL [N]).

    KL = sum_r pi_r (KL_r + log pi_r - log rho_r), pi and rho the shards' shares of the policy's
    and the reference's mass."""
    m64, ld64, mr64, ldr64 = m.double(), log_d.double(), m_ref.double(), log_d_ref.double()
    lse, log_pi = _log_weights(m64, ld64)
    lse_ref, log_rho = _log_weights(mr64, ldr64)
    pi = torch.exp(log_pi)
    val = torch.where(pi > 0, pi * (kl.double() + log_pi - log_rho), torch.zeros_like(pi)).sum(0)
    val = torch.where(torch.isnan(lse) | torch.isnan(lse_ref), lse + lse_ref, val)
    big_m, big_mr = m64.amax(0), mr64.amax(0)
    stats = torch.stack((big_m, lse - big_m, big_mr, lse_ref - big_mr), 1).float()
    return stats, val.float()


def upstream(g, lab):
    """An upstream gradient [...] (or None) -> float32 [N], 0 on rows that get no gradient."""
    if g is None:
        return None
    return torch.where(lab.valid, g.reshape(-1).float(), 0.0).contiguous()


def add_label_onehot(grad, lab, g_logp, inv_t):
    """grad [N, V_local] += g_logp / T at (row, its label) for the rows this rank owns, in place
    (the one-hot term of d logp_y / dz). Float32 arithmetic as the kernels'; deterministic (one
    write per row)."""
    if g_logp is None:
        return grad
    rows = torch.arange(grad.shape[0], device=grad.device)
    coef = torch.where(lab.mine, g_logp * inv_t, 0.0)
    cur = grad[rows, lab.local]
    grad[rows, lab.local] = torch.where(lab.mine, cur.float() + coef, cur.float()).to(grad.dtype)
    return grad


def sink_head(weight, bias):
    """An LM head's local weight [V_local, H] and bias [V_local] or None -> (weight [V_local + 1, H],
    bias [V_local + 1]) with one sink row: weight 0, bias -inf, so its logit is -inf, its
    probability 0, and a one-hot gradient on it reaches neither d_hidden (its weight row is 0) nor
    the caller (the caller drops the sink row of d_weight and d_bias)."""
    w = torch.cat((weight, weight.new_zeros((1, weight.shape[1]))))
    b = bias if bias is not None else weight.new_zeros((weight.shape[0],))
    b = torch.cat((b, b.new_full((1,), -math.inf)))
    return w.contiguous(), b.contiguous()
