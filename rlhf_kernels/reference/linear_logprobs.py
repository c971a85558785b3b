"""Log-probabilities and entropy from hidden states and the LM head, in eager PyTorch.

    logits = hidden @ weight.T (+ bias),  then token_logprobs(logits, labels) (reference/logprobs.py)

``linear_token_logprobs`` builds the whole [N, V] logits: the test oracle (run in float64).
``chunked_linear_token_logprobs`` is the ``torch`` backend, the chunked fallback training
frameworks use: tokens in chunks, each chunk's logits in float32, recomputed in the
backward (activation checkpointing), so at most one chunk of logits is alive at a time.
"""

import torch
from torch.utils.checkpoint import checkpoint

from rlhf_kernels.reference.logprobs import token_logprobs

# Elements of one chunk's float32 logits (64 MiB); eager softmax makes a few copies of it.
CHUNK_ELEMS = 1 << 24


def linear_token_logprobs(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100):
    """hidden [..., H], weight [V, H], bias [V] or None, labels [...] -> (logp, entropy) in
    the inputs' dtype, through the full [..., V] logits."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, labels, temperature, ignore_index)


def _chunk(hidden, weight, bias, labels, temperature, ignore_index):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits.float(), labels, temperature, ignore_index)


def chunked_linear_token_logprobs(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100,
                                  chunk_elems=None):
    """hidden [N, H], labels [N] -> float32 (logp [N], entropy [N]); the logits of at most
    ``chunk_elems // V`` tokens at a time (default CHUNK_ELEMS, read per call), recomputed in the
    backward."""
    N, V = hidden.shape[0], weight.shape[0]
    chunk_elems = CHUNK_ELEMS if chunk_elems is None else chunk_elems
    step = max(1, chunk_elems // max(V, 1))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    logps, ents = [], []
    for s in range(0, N, step) or [0]:  # N == 0: one empty chunk, so the outputs still have a graph
        args = (hidden[s:s + step], weight, bias, labels[s:s + step], temperature, ignore_index)
        lp, ent = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents)
