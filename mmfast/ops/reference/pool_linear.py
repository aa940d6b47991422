"""Reference pool-then-linear: the first linear layer of the pooling network ρ applied to every
subset's sum (METHOD.md, SumPooling)."""
from __future__ import annotations

import torch

from mmfast.ops.reference._common import acc_dtype
from mmfast.ops.reference.pooling import subset_sum_pool


def subset_pool_linear(g: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``W · Σ_{m∈S} g_m + b`` for every subset S of the mask.

    Written the direct way round (pool, then one linear map per subset) for clarity; the fast
    path moves W inside the sum (``Σ_{m∈S} W g_m``), which is the same number.

    Args:
        g: ``[B, M, D]`` per-modality features.
        mask: bool ``[B, M]`` or ``[B, S, M]`` (may be a stride-0 expanded bank).
        weight: ``[out, D]``.
        bias: ``[out]`` or None.
    Returns:
        ``[B, out]`` or ``[B, S, out]`` in ``g.dtype``, computed in float32 (float64 for float64).
        Features of a modality in none of a row's subsets are never read.
    """
    acc = acc_dtype(g.dtype)
    pooled = subset_sum_pool(g.to(acc), mask)
    out = torch.nn.functional.linear(pooled, weight.to(acc),
                                     None if bias is None else bias.to(acc))
    return out.to(g.dtype)
