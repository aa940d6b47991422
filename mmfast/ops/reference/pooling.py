"""Reference masked subset sum-pooling (METHOD.md: the SumPooling reduction)."""
from __future__ import annotations

import torch

from mmfast.ops.reference._common import acc_dtype, drop_subset_axis, subset_axes


def subset_sum_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the features of the modalities in each subset.

    Each subset selects its own members before summing (``torch.where`` per subset, never a
    multiplication by the mask): features outside a subset have no influence on it, even inf or
    NaN that another subset of the same row holds. This materialises ``[B, S, M, D]``: it is the
    ground truth, written for clarity, not speed.

    Args:
        x: ``[B, M, D]`` features.
        mask: bool ``[B, M]`` or ``[B, S, M]`` (may be a stride-0 expanded bank).
    Returns:
        ``[B, D]`` or ``[B, S, D]`` in ``x.dtype``, accumulated in float32 (float64 for float64).
    """
    acc = acc_dtype(x.dtype)
    members = subset_axes(mask).unsqueeze(-1)                         # [B, S, M, 1]
    out = torch.where(members, x.to(acc).unsqueeze(1), 0.0).sum(dim=2)
    return drop_subset_axis(out, mask).to(x.dtype)
