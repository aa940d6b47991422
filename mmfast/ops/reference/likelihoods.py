"""Reference observation log-likelihoods, summed over each sample's event axes.

Parameters come as ``[K, B, *event]`` (K latent samples decoded for B data points), data as
``[B, *event]``; every result is ``[K, B]`` in the accumulation dtype (float32, or float64
for float64 inputs).
"""
from __future__ import annotations

import torch

from mmfast.ops.reference._common import LOG_2PI, acc_dtype


def _sum_event(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).sum(dim=-1) if t.dim() > 2 else t


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Σ x·l − softplus(l)`` with x in [0, 1] (soft targets allowed)."""
    acc = acc_dtype(logits.dtype)
    l, x = logits.to(acc), x.to(acc)
    # logaddexp(l, 0) is softplus, stable for any l and with the right derivative sigmoid(l)
    # at l = 0, where max(l, 0) + log1p(exp(-|l|)) differentiates to 1 instead of 1/2.
    softplus = torch.logaddexp(l, torch.zeros_like(l))
    return _sum_event(x * l - softplus)


def categorical_log_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``Σ_event log softmax(logits)[target]``; logits ``[K, B, *event, C]``, target int64
    ``[B, *event]``."""
    acc = acc_dtype(logits.dtype)
    C = logits.shape[-1]
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    # An index outside [0, C) gives a NaN row, as the kernel does, not an out-of-bounds gather
    # (a device-side assert on a GPU, where the op does not check the values).
    in_range = (target >= 0) & (target < C)
    index = target.clamp(0, max(C - 1, 0)).unsqueeze(0).expand(logits.shape[:-1]).unsqueeze(-1)
    picked = torch.gather(logp, -1, index).squeeze(-1)
    return _sum_event(torch.where(in_range, picked, torch.full((), float("nan"), dtype=acc,
                                                                 device=logp.device)))


def _scale(log_scale: torch.Tensor, min_scale: float, acc: torch.dtype) -> torch.Tensor:
    return min_scale + torch.exp(log_scale.to(acc))


def normal_log_prob(loc: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor,
                    min_scale: float = 0.0) -> torch.Tensor:
    """``Σ log N(x; loc, scale²)`` with ``scale = min_scale + exp(log_scale)``."""
    acc = acc_dtype(loc.dtype)
    scale = _scale(log_scale, min_scale, acc)
    r = (x.to(acc) - loc.to(acc)) / scale
    return _sum_event(-0.5 * r * r - torch.log(scale) - 0.5 * LOG_2PI)


def laplace_log_prob(loc: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor,
                     min_scale: float = 0.0) -> torch.Tensor:
    """``Σ log Laplace(x; loc, scale)`` with ``scale = min_scale + exp(log_scale)``."""
    acc = acc_dtype(loc.dtype)
    scale = _scale(log_scale, min_scale, acc)
    return _sum_event(-(x.to(acc) - loc.to(acc)).abs() / scale - torch.log(2.0 * scale))
