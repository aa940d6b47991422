"""Helpers shared by the aggregators: mask handling and the heads that turn ρ's output into a
posterior."""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast.distributions import DiagGaussian, DiagGaussianMixture


def check_inputs(name: str, features: Tensor, mask: Tensor, feature_dim: int) -> None:
    if not isinstance(features, Tensor) or features.dim() != 3 or features.shape[-1] != feature_dim:
        shape = list(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name}: features has shape {shape}; expected [B, M, {feature_dim}]")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name}: mask must be a bool tensor [B, M] or [B, S, M]")
    B, M, _ = features.shape
    if mask.dim() not in (2, 3) or mask.shape[0] != B or mask.shape[-1] != M:
        raise ValueError(f"{name}: mask has shape {list(mask.shape)}; expected [{B}, {M}] or "
                         f"[{B}, S, {M}]")


def members(mask: Tensor) -> Tensor:
    """``[B, M]``: modality m is in at least one of row b's subsets."""
    return mask if mask.dim() == 2 else mask.any(dim=1)


def zero_unused(features: Tensor, mask: Tensor) -> Tensor:
    """Replace the features of modalities in none of a row's subsets by zeros, with ``where``
    (not a product), so NaN there reaches neither the values nor the gradients downstream."""
    return torch.where(members(mask).unsqueeze(-1), features, torch.zeros((), dtype=features.dtype,
                                                                          device=features.device))


def gaussian_head(out: Tensor, latent_dim: int) -> DiagGaussian:
    """``[..., 2d]`` -> DiagGaussian(mu = first half, logvar = second half)."""
    mu, logvar = out.split(latent_dim, dim=-1)
    return DiagGaussian(mu, logvar)


def mixture_out_dim(latent_dim: int, components: int) -> int:
    return components * (2 * latent_dim + 1)


def mixture_head(out: Tensor, latent_dim: int, components: int) -> DiagGaussianMixture:
    """``[..., C (2d + 1)]`` -> a C-component mixture: C logits, then C means and C logvars."""
    logits, params = out.split((components, 2 * components * latent_dim), dim=-1)
    params = params.unflatten(-1, (components, 2 * latent_dim))
    mu, logvar = params.split(latent_dim, dim=-1)
    return DiagGaussianMixture(logits, mu, logvar)
