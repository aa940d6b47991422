"""Priors p(z): the standard normal and a learnable diagonal Gaussian mixture (METHOD.md).

A prior is an ``nn.Module`` with ``latent_dim``, ``log_prob(z [K, *batch, d]) -> [K, *batch]``,
``sample(n) -> [n, d]``, ``distribution()`` and ``fused_args()``: what
:func:`mmfast.ops.gaussian_terms` takes as its ``prior`` (None for N(0, I), or the mixture's
``(logits, mu, logvar)``), which is how the model's fast path recognises it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfast import ops
from mmfast.distributions import DiagGaussian, DiagGaussianMixture

__all__ = ["StandardNormal", "GaussianMixture"]


def _check_dim(name: str, latent_dim) -> int:
    if not isinstance(latent_dim, int) or isinstance(latent_dim, bool) or latent_dim < 1:
        raise ValueError(f"{name}: latent_dim must be a positive int, got {latent_dim!r}")
    return latent_dim


class StandardNormal(nn.Module):
    """``p(z) = N(0, I_d)``. Holds no parameters; a buffer carries the device and dtype."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = _check_dim("StandardNormal", latent_dim)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def distribution(self) -> DiagGaussian:
        zeros = self._anchor.new_zeros(self.latent_dim)
        return DiagGaussian(zeros, zeros)

    def log_prob(self, z: Tensor) -> Tensor:
        """z ``[K, *batch, d]`` -> ``[K, *batch]``."""
        zero = z.new_zeros(()).expand(self.latent_dim)
        return ops.gaussian_log_prob(z, zero, zero)

    def sample(self, n: int) -> Tensor:
        """``[n, d]`` draws."""
        return torch.randn(n, self.latent_dim, dtype=self._anchor.dtype, device=self._anchor.device)

    def fused_args(self):
        return None

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"


class GaussianMixture(nn.Module):
    """Learnable ``p(z) = Σ_c softmax(logits)_c N(mu_c, diag(exp(logvar_c)))`` (METHOD.md: the
    prior used for identifiability).

    Args:
        latent_dim: d.
        components: number of mixture components C.
        init_spread: the component means start at ``init_spread · N(0, I)`` so that they differ.
    """

    def __init__(self, latent_dim: int, components: int = 5, init_spread: float = 1.0):
        super().__init__()
        self.latent_dim = _check_dim("GaussianMixture", latent_dim)
        if not isinstance(components, int) or components < 1:
            raise ValueError(f"GaussianMixture: components must be a positive int, got {components!r}")
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))
        self.mu = nn.Parameter(init_spread * torch.randn(components, latent_dim))
        self.logvar = nn.Parameter(torch.zeros(components, latent_dim))

    def distribution(self) -> DiagGaussianMixture:
        return DiagGaussianMixture(self.logits, self.mu, self.logvar)

    def log_prob(self, z: Tensor) -> Tensor:
        """z ``[K, *batch, d]`` -> ``[K, *batch]`` (differentiable in the prior's parameters)."""
        logits, mu, logvar = (t.to(z.dtype) for t in (self.logits, self.mu, self.logvar))
        return ops.mixture_log_prob(z, logits, mu, logvar)

    def sample(self, n: int) -> Tensor:
        """``[n, d]`` draws (component from the weights, then the Gaussian)."""
        return self.distribution().sample(n)

    def fused_args(self):
        return self.logits, self.mu, self.logvar

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, components={self.components}"
