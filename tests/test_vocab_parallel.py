"""Vocabulary-parallel log-probs, entropy, KL and linear_token_logprobs (``process_group=``).

The convention (Megatron's): rank r of W holds vocabulary ids [r * V_local, (r + 1) * V_local);
labels are global. Each multi-process test spawns W gloo processes (torch.multiprocessing, file
init, one thread each); every rank draws the same full-vocabulary inputs from one seed, keeps its
slice, and compares with a float64 evaluation on the whole vocabulary, on every CPU backend
(torch, cpu, triton under the interpreter). Outputs must be bitwise the same on every rank.
NCCL runs of the same worker are marked `cuda` and skip with fewer than two GPUs.
"""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlhf_kernels as rk
from rlhf_kernels import _backend
from rlhf_kernels.ops import _vocab_parallel as vp

ATOL, RTOL = 1e-5, 1e-5          # float32 kernels against float64 on O(1) log-probs
GRAD_ATOL = 1e-6                 # gradients: entries are O(1/V)
V_LOCAL = 5                      # not a multiple of any block
TEMPERATURE = 0.7
IGNORE = -100
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "isend",
               "irecv", "reduce", "gather", "scatter", "barrier")


# ---- the combine, on one process: shards simulated by slicing ----

def _shard_stats(s):
    m = s.amax(-1)
    log_d = torch.log(torch.exp(s - m[:, None]).sum(-1))
    p = torch.softmax(s, -1)
    h = -(p * torch.log_softmax(s, -1)).sum(-1)
    return m.float(), log_d.float(), h.float()


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_combine_softmax_equals_the_whole_vocabulary(W):
    g = torch.Generator().manual_seed(W)
    s = torch.randn(6, 7 * W, generator=g, dtype=torch.float64) * 4
    if W > 1:
        s[0, :7] = -math.inf  # a shard with only -inf logits adds nothing
    parts = [_shard_stats(s[:, r * 7:(r + 1) * 7]) for r in range(W)] if W > 1 else [_shard_stats(s)]
    if W > 1:  # row 0's first shard has d = 0: its stats as the kernels give them
        parts[0] = tuple(t.clone() for t in parts[0])
        parts[0][0][0], parts[0][1][0], parts[0][2][0] = -math.inf, -math.inf, math.nan
    m, log_d, h = (torch.stack(c) for c in zip(*parts))
    stats, ent, log_pi = vp.combine_softmax(m, log_d, h)
    lse = torch.logsumexp(s, -1)
    ref_h = -(torch.softmax(s, -1) * torch.log_softmax(s, -1)).nan_to_num().sum(-1)
    torch.testing.assert_close(ent.double(), ref_h, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close((stats[:, 0] + stats[:, 1]).double(), lse, atol=ATOL, rtol=RTOL)
    assert torch.equal(stats[:, 0], s.amax(-1).float())
    assert log_pi.shape == (W, 6)


@pytest.mark.parametrize("W", [2, 3])
def test_combine_kl_equals_the_whole_vocabulary(W):
    g = torch.Generator().manual_seed(10 + W)
    s = torch.randn(5, 4 * W, generator=g, dtype=torch.float64) * 3
    r = s + torch.randn(5, 4 * W, generator=g, dtype=torch.float64) * 0.5
    cols = []
    for k in range(W):
        a, b = s[:, 4 * k:4 * k + 4], r[:, 4 * k:4 * k + 4]
        kl = (torch.softmax(a, -1) * (torch.log_softmax(a, -1) - torch.log_softmax(b, -1))).sum(-1)
        ma, lda, _ = _shard_stats(a)
        mb, ldb, _ = _shard_stats(b)
        cols.append((ma, lda, mb, ldb, kl.float()))
    stats, kl = vp.combine_kl(*(torch.stack(c) for c in zip(*cols)))
    ref = (torch.softmax(s, -1) * (torch.log_softmax(s, -1) - torch.log_softmax(r, -1))).sum(-1)
    torch.testing.assert_close(kl.double(), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close((stats[:, 2] + stats[:, 3]).double(), torch.logsumexp(r, -1), atol=ATOL, rtol=RTOL)


def test_localize_labels():
    shard = vp.VocabShard(None, 1, 3, 4, 4)
    y = torch.tensor([0, 4, 7, 8, 11, IGNORE, 12, -2])
    lab = vp.localize_labels(y, shard, IGNORE)
    assert lab.local.tolist() == [0, 0, 3, 0, 0, 0, 0, 0]
    assert lab.sink.tolist() == [4, 0, 3, 4, 4, -1, -1, -1]
    assert lab.owner.tolist() == [0, 1, 1, 2, 2, 0, 0, 0]
    assert lab.mine.tolist() == [False, True, True, False, False, False, False, False]
    assert lab.valid.tolist() == [True] * 5 + [False] * 3
    assert lab.ignored.tolist() == [False] * 5 + [True, False, False]
