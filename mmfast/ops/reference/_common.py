"""Small helpers shared by the reference ops."""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def subset_axes(mask: torch.Tensor) -> torch.Tensor:
    """View a ``[B, M]`` or ``[B, S, M]`` mask as ``[B, S, M]`` (S = 1 for per-row masks)."""
    return mask.unsqueeze(1) if mask.dim() == 2 else mask


def drop_subset_axis(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undo :func:`subset_axes` on an output whose axis 1 is the subset axis."""
    return out.squeeze(1) if mask.dim() == 2 else out


def in_any_subset(mask: torch.Tensor) -> torch.Tensor:
    """``[B, M]``: whether modality m is in at least one of row b's subsets. Features of a
    modality in none of them are never read, so NaN there (a missing modality) cannot leak."""
    return subset_axes(mask).any(dim=1)
