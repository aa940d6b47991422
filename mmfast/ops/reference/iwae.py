"""Reference importance-weighted log-mean-exp over the K samples (METHOD.md's IWAE value)."""
from __future__ import annotations

import math

import torch

from mmfast.ops.reference._common import acc_dtype


def importance_logsumexp(w: torch.Tensor) -> torch.Tensor:
    """``logsumexp_k w_k − log K`` over axis 0.

    Args:
        w: ``[K, *batch]`` log importance weights.
    Returns:
        ``[*batch]`` in the accumulation dtype (float32, or float64 for float64 inputs).
    """
    return torch.logsumexp(w.to(acc_dtype(w.dtype)), dim=0) - math.log(w.shape[0])
