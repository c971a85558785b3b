"""Log-probabilities and entropy from hidden states and the LM head, in eager PyTorch.

    logits = hidden @ weight.T (+ bias),  then token_logprobs(logits, labels) (reference/logprobs.py)

``linear_token_logprobs`` builds the whole [N, V] logits: the test oracle (run in float64).
``chunked_linear_token_logprobs`` is the ``torch`` backend, the chunked fallback training
frameworks use: tokens in chunks, each chunk's logits in float32, recomputed in the
backward (activation checkpointing), so at most one chunk of logits is alive at a time.
Batch invariant: every chunk is a fresh [step, H] block, step fixed by V alone and the last chunk
padded (labels ignore_index), so each matmul has the same shape whatever N is and a row's logp,
entropy and d_hidden row do not depend on the other rows of its batch (cost: up to step - 1
padded rows per call).
"""

import torch
from torch.utils.checkpoint import checkpoint

from rlhf_kernels.reference.logprobs import token_logprobs

# Elements of one chunk's float32 logits (64 MiB); eager softmax makes a few copies of it.
CHUNK_ELEMS = 1 << 24
# The most rows per chunk (a power of two; chunks have a fixed number of rows: see the top).
MAX_CHUNK_ROWS = 1024


def linear_token_logprobs(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100):
    """hidden [..., H], weight [V, H], bias [V] or None, labels [...] -> (logp, entropy) in
    the inputs' dtype, through the full [..., V] logits."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, labels, temperature, ignore_index)


def _chunk(hidden, weight, bias, labels, temperature, ignore_index):
    """hidden [step, H] (a padded block), labels [step] -> float32 (logp, entropy) [step]."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits.float(), labels, temperature, ignore_index)


def chunked_linear_token_logprobs(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100,
                                  chunk_elems=None):
    """hidden [N, H], labels [N] -> float32 (logp [N], entropy [N]); the logits of ``step`` tokens at
    a time (the largest power of two <= chunk_elems // V and MAX_CHUNK_ROWS; chunk_elems defaults to
    CHUNK_ELEMS, read per call), each chunk a fresh [step, H] block (the last padded), recomputed
    in the backward."""
    N, H = hidden.shape
    V = weight.shape[0]
    chunk_elems = CHUNK_ELEMS if chunk_elems is None else chunk_elems
    want = min(max(1, chunk_elems // max(V, 1)), MAX_CHUNK_ROWS)
    step = 1 << (want.bit_length() - 1)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    logps, ents = [], []
    for s in range(0, N, step) or [0]:  # N == 0: one empty chunk, so the outputs still have a graph
        x, y = hidden[s:s + step], labels[s:s + step]
        n = x.shape[0]
        # a fresh block of `step` rows (a copy even when whole: the same allocation alignment for
        # every chunk); the padding rows are ignored and cut off
        block = torch.cat((x, x.new_zeros(step - n, H)))
        y = torch.cat((y, y.new_full((step - n,), ignore_index)))
        args = (block, weight, bias, y, temperature, ignore_index)
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        logps.append(lp[:n])
        ents.append(ent[:n])
    return torch.cat(logps), torch.cat(ents)
