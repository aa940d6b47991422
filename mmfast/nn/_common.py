"""Helpers shared by the aggregators: mask handling and the heads that turn ρ's output into a
posterior."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfast.distributions import DiagGaussian, DiagGaussianMixture
from mmfast.nn.mlp import MLP


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


class RhoHead:
    """Mixin of the pooling aggregators: ρ after the masked sum, to a DiagGaussian.

    ``rho_in`` is ρ's first Linear, kept apart so that a subset bank can move it inside the sum
    (``W Σ g_m = Σ W g_m``); ``rho`` is the rest. Classes using it set ``latent_dim`` first.
    """

    def _build_rho(self, in_dim: int, hidden: int, num_layers: int,
                   activation: type[nn.Module]) -> None:
        self.rho_in = nn.Linear(in_dim, hidden)
        self.rho = nn.Sequential(activation(),
                                 MLP(hidden, self._out_dim(), [hidden] * (num_layers - 1), activation))

    def _out_dim(self) -> int:
        return 2 * self.latent_dim

    def _head(self, out: Tensor):
        return gaussian_head(out, self.latent_dim)


class MixtureRhoHead:
    """Put before a :class:`RhoHead` aggregator: ρ outputs C logits, C means and C logvars of a
    diagonal Gaussian mixture. Classes using it set ``components`` before building ρ."""

    def _out_dim(self) -> int:
        return mixture_out_dim(self.latent_dim, self.components)

    def _head(self, out: Tensor):
        return mixture_head(out, self.latent_dim, self.components)
