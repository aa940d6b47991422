"""``importance_logsumexp``: the importance-weighted estimate ``log (1/K) Σ_k exp(w_k)``.

The last step of both objectives and of the IWAE log-likelihood (METHOD.md): a numerically
stable log-mean-exp over the K importance samples, with its backward ``softmax_k(w)`` times the
upstream gradient.
"""
from __future__ import annotations

from torch import Tensor

from mmfast.ops import _validate as V
from mmfast.ops import reference as ref
from mmfast.ops._custom import define_op
from mmfast.ops.reference._common import acc_dtype

_importance_logsumexp = define_op(
    "importance_logsumexp", args="Tensor w", differentiable=(0,),
    reference=ref.importance_logsumexp, kernel_module="iwae",
    fake_out=lambda w: w.new_empty(w.shape[1:], dtype=acc_dtype(w.dtype)))


def importance_logsumexp(w: Tensor) -> Tensor:
    """``logsumexp_k w_k − log K``: the log of the mean importance weight.

    Args:
        w: ``[K, *batch]`` log importance weights, K >= 1 (float16, bfloat16, float32 or
            float64). Entries of -inf (zero weight) are allowed.
    Returns:
        ``[*batch]`` in float32 (float64 for float64 inputs). Its gradient with respect to w is
        ``softmax_k(w)`` times the upstream gradient.
    """
    op = "importance_logsumexp"
    V.tensor(op, "w", w, min_ndim=1, expected="[K, *batch]")
    if w.shape[0] < 1:
        raise ValueError(f"{op}: w has shape {list(w.shape)}; expected [K, *batch] with K >= 1")
    return _importance_logsumexp(w)
