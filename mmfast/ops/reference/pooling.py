"""Reference masked subset sum-pooling (METHOD.md: the SumPooling reduction)."""
from __future__ import annotations

import torch

from mmfast.ops.reference._common import acc_dtype, in_any_subset


def subset_sum_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the features of the modalities in each subset.

    Args:
        x: ``[B, M, D]`` features.
        mask: bool ``[B, M]`` or ``[B, S, M]`` (may be a stride-0 expanded bank).
    Returns:
        ``[B, D]`` or ``[B, S, D]`` in ``x.dtype``, accumulated in float32 (float64 for float64).
    """
    acc = acc_dtype(x.dtype)
    xs = torch.where(in_any_subset(mask).unsqueeze(-1), x.to(acc), 0.0)
    weights = mask.to(acc)
    if mask.dim() == 2:
        out = torch.einsum("bm,bmd->bd", weights, xs)
    else:
        out = torch.einsum("bsm,bmd->bsd", weights, xs)
    return out.to(x.dtype)
