"""Reward-model loss on absolute scores (a Likert rating per response, not a comparison).

    regression: loss = mean(0.5 * (pred - score)^2)
    ordinal:    cumulative-link (logistic) model over K levels with thresholds t_0 < ... < t_{K-2}:
                P(level <= k | pred) = sigmoid(t_k - pred), t_{-1} = -inf, t_{K-1} = +inf;
                loss = mean(-log P(level = score | pred)), with
                log P(level = y) = logsigmoid(t_y - pred) + logsigmoid(pred - t_{y-1}) + log(-expm1(t_{y-1} - t_y))
                (never a difference of two sigmoids near 1).
One fused forward computes the loss, the statistics and the gradient factors (d loss / d pred,
and for ordinal d loss / d thresholds); the backward scales them by the upstream gradient.
No host sync, but for ``validate`` on a GPU (below).
"""

import torch

from rlhf_kernels import _backend, _ext
from rlhf_kernels._layout import N_SCORE_STATS, SCORE_KINDS, SCORE_STATS
from rlhf_kernels._signatures import f32, shape
from rlhf_kernels._stats import stats as _stats
from rlhf_kernels.ops import _validate as v
from rlhf_kernels.reference import score as ref

NATIVE = _backend.NATIVE
KIND_CODES = {name: code for code, name in enumerate(SCORE_KINDS)}
if _ext.loaded() and hasattr(torch.ops.rlhf_kernels, "score_fwd"):
    _score_fwd = torch.ops.rlhf_kernels.score_fwd.default
else:
    _score_fwd = None


def _kind_code(op, kind):
    if not isinstance(kind, str):
        raise TypeError("%s: `kind` must be a string, one of %s, got %r" % (op, ", ".join(SCORE_KINDS), kind))
    return KIND_CODES[kind] if kind in KIND_CODES else v.choice(op, "kind", kind, KIND_CODES)  # (raises)


def _check(op, pred, score, kind, thresholds):
    v.tensor(op, "pred", pred, ndim=1, kind="float")
    if kind == "regression":
        v.tensor(op, "score", score, kind="float")
        v.same_shape(op, "pred", pred, "score", score)
        if thresholds is not None:
            raise ValueError("%s: `thresholds` is for kind='ordinal'; kind='regression' takes none, got a tensor "
                             "of shape %s" % (op, list(thresholds.shape) if isinstance(thresholds, torch.Tensor)
                                              else type(thresholds).__name__))
    else:
        if not isinstance(score, torch.Tensor) or score.is_floating_point():
            v.tensor(op, "score", score)
            raise TypeError("%s: `score` must be an integer tensor of levels in [0, K) for kind='ordinal', got %s"
                            % (op, score.dtype))
        v.tensor(op, "score", score, kind="int")
        v.same_shape(op, "pred", pred, "score", score)
        if thresholds is None:
            raise ValueError("%s: kind='ordinal' needs `thresholds` [K-1] (increasing), got None" % op)
        v.tensor(op, "thresholds", thresholds, ndim=1, kind="float")
    v.same_device(op, "pred", pred, score=score, thresholds=thresholds)


def _check_values(op, score, thresholds):
    """``validate`` for kind='ordinal' on the torch and triton backends (the native ops check in
    C++): levels in [0, K), thresholds finite and strictly increasing. Reads them back: one
    host sync on a GPU; skipped while a CUDA graph is captured."""
    if score.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    K = thresholds.shape[0] + 1
    if score.numel():
        bad = (score < 0) | (score >= K)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError("%s: `score` must hold levels in [0, K) = [0, %d) for kind='ordinal' (K = "
                             "thresholds.shape[0] + 1), but score[%d] = %d" % (op, K, i, int(score[i])))
    t = thresholds.detach()
    if t.numel() and not bool(torch.isfinite(t).all() & (t[1:] > t[:-1]).all()):
        raise ValueError("%s: `thresholds` must be finite and strictly increasing, got %s"
                         % (op, [round(x, 6) for x in t.double().tolist()[:16]]))


def score_loss(pred, score, *, kind="regression", thresholds=None, backend="auto", validate=True):
    """Reward-model loss on absolute scores.

    Args:
        pred: [P] float32, bfloat16 or float16: the reward head's scalar per response; receives
            gradients.
        score: kind="regression": [P] float, the target (the caller maps a Likert range to a
            standard scale); kind="ordinal": [P] integer level in [0, K). Constant.
        kind: "regression": loss = mean(0.5 * (pred - score)^2).
            "ordinal": the cumulative-link (logistic) model, P(level <= k) = sigmoid(t_k - pred);
            loss = mean(-log P(level = score)), evaluated in log space (module docstring).
        thresholds: kind="ordinal" only: [K-1] float t_0 < ... < t_{K-2}; receives gradients
            (keep them as parameters, e.g. a cumulative sum of positive gaps so they stay
            increasing). K = 1 (shape [0]) is allowed: every level is 0 and the loss is 0.
        validate: kind="ordinal": raise a ValueError for a level outside [0, K) or thresholds
            that are not finite and strictly increasing. On a GPU the check reads them back:
            one host sync per call; skipped while a CUDA graph is captured and inside
            torch.compile graphs on a GPU. Unchecked, a level outside [0, K) gives a NaN loss
            term and no gradient from that element (never an out-of-bounds read); equal
            thresholds give +inf, reversed ones NaN, for the elements whose level lies between them.
        backend: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        (loss, stats): loss 0-d float32 (0 for P = 0, with zero gradients); stats, a read-only
        mapping of 0-d float32 tensors (``stats.packed``: all four in one tensor):
        regression: ``mse`` = mean((pred - score)^2), ``mae`` = mean|pred - score|;
        ordinal: ``accuracy`` = mean(most likely level == score) (the lower level on a tie),
        ``mae`` = mean|E[level | pred] - score| with E[level | pred] = sum_k sigmoid(pred - t_k);
        both: ``pred_mean``, ``pred_std`` (population: divided by P).
    """
    op = "score_loss"
    code = _kind_code(op, kind)
    name = _backend.pick(backend, pred, op, "pred")
    if torch.compiler.is_compiling():
        validate = validate and not pred.is_cuda  # no host sync inside a compiled graph
    names = SCORE_STATS[kind]
    if name in NATIVE and _score_fwd is not None:
        try:
            loss, packed, _, _ = _score_fwd(pred, score, thresholds, code, validate)
        except RuntimeError as e:
            raise v.schema_error(op, e) from None
        return loss, _stats(names, packed)
    _check(op, pred, score, kind, thresholds)
    if name in NATIVE:  # an extension built before score_loss existed
        if backend not in (None, "auto"):
            raise _backend.BackendUnavailable("%s: backend %r cannot serve this call: the extension was built "
                                              "without score_loss (rebuild it)" % (op, name))
        name = "torch"
    if validate and kind == "ordinal" and not torch.compiler.is_compiling():
        _check_values(op, score, thresholds)
    p = v.as_f32(pred)
    t = None if thresholds is None else v.as_f32(thresholds)
    if kind == "regression":
        s = v.as_f32(score).detach()
    else:
        s = (score if score.dtype in (torch.int32, torch.int64) else score.long()).contiguous()
    if name == "torch":
        loss, stats = ref.score_loss(p.double(), s.double() if kind == "regression" else s, kind,
                                     None if t is None else t.double())
        return loss.float(), _stats(names, torch.stack([stats[k] for k in names]).float())
    from rlhf_kernels.triton import score as tri
    loss, packed, _, _ = tri.score_forward(p, s, t, code)
    return loss, _stats(names, packed)


# ---- output shapes of the native ops and their Triton twins (rlhf_kernels/_signatures.py) ----

@shape("score_fwd")
def _score_shapes(pred, thresholds, **_):
    k1 = 0 if thresholds is None else thresholds.shape[0]
    return f32(pred, ()), f32(pred, (N_SCORE_STATS,)), f32(pred, pred.shape), f32(pred, (k1,))
