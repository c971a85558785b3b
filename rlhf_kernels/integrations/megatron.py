"""Drop-in replacement for megatron-core's vocabulary-parallel cross entropy, and ``patch()``.

    import rlhf_kernels.integrations.megatron as rk_megatron
    rk_megatron.patch()      # after megatron's parallel_state is initialized, or `with ...:`

Supported: megatron-core whose function has the signature below (checked by ``patch()``; tested
with megatron-core 0.16.1). The logits are this rank's vocabulary slice [..., V / tp], the group
is megatron's tensor-parallel group (``parallel_state.get_tensor_model_parallel_group()``), the
targets are global ids, as megatron's.

| megatron-core | ours | differences |
|---|---|---|
| tensor_parallel.vocab_parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0) (also where verl's Megatron backend and GPTModel's loss call it) | -rk.token_logprobs(process_group=) | one all-gather of 4 float32 per token in the forward and no collective in the backward (megatron: 3 all-reduces in the forward, and a float32 softmax [N, V / tp] saved); the logits are never written over (megatron's forward writes over float32 logits); a target outside [0, V) raises a ValueError (megatron gives its row log sum exp(z - max)) |

Not replaced (the call goes to megatron's own function, with a one-time FallThroughWarning):
label_smoothing > 0, and float64 logits.
"""

import rlhf_kernels as rk
from rlhf_kernels.integrations._common import Integration, Replacement, kernel_dtype, never_label

__all__ = ["patch", "unpatch", "is_patched", "vocab_parallel_cross_entropy"]

TESTED_VERSION = "0.16.1"


def vocab_parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0):
    """megatron-core's vocab_parallel_cross_entropy: -log softmax(logits)[target] over the whole
    vocabulary from this rank's slice [..., V / tp]; target [...] global ids -> float32 [...]."""
    logits = vocab_parallel_logits
    if label_smoothing:
        return _MEGATRON.fall_through("vocab_parallel_cross_entropy", "label_smoothing > 0", logits, target,
                                      label_smoothing)
    if not kernel_dtype(logits):
        return _MEGATRON.fall_through("vocab_parallel_cross_entropy", "float64 logits (our ops output float32)",
                                      logits, target, label_smoothing)
    from megatron.core import parallel_state
    group = parallel_state.get_tensor_model_parallel_group()
    return -rk.token_logprobs(logits, target, ignore_index=never_label(target), process_group=group)


_MEGATRON = Integration("megatron", "megatron-core>=0.16,<0.17", TESTED_VERSION, [
    Replacement("megatron.core.tensor_parallel.cross_entropy:vocab_parallel_cross_entropy",
                vocab_parallel_cross_entropy, "(vocab_parallel_logits, target, label_smoothing=0.0)"),
])


def patch():
    """Swap megatron-core's vocab_parallel_cross_entropy for ours wherever megatron's loaded
    modules hold it (megatron.core.tensor_parallel and its cross_entropy module, and any module that
    imported it by name); returns a handle that, as a context manager, unpatches on exit."""
    return _MEGATRON.patch()


def unpatch():
    """Restore megatron-core's own function. Returns False (and logs) if it was not patched."""
    return _MEGATRON.unpatch()


def is_patched():
    return _MEGATRON.is_patched()
