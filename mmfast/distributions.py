"""Posterior distributions over latents: a diagonal Gaussian and a diagonal Gaussian mixture.

Both follow ``torch.distributions`` (``rsample``, ``log_prob``, ``mean``, ``batch_shape``,
``event_shape``) with one convenience: ``rsample(K)`` with an int draws ``K`` samples, shaped
``[K, *batch, d]``, the layout every mmfast op expects. Log-densities go through
:mod:`mmfast.ops`, so they run on whichever backend is in force.

Indexing a distribution indexes its batch axes: ``posterior[:, 3]`` is the distribution of the
fourth subset of a ``[B, S]`` bank.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from mmfast import ops

__all__ = ["DiagGaussian", "DiagGaussianMixture"]


def _sample_shape(sample_shape) -> torch.Size:
    if isinstance(sample_shape, int):
        if sample_shape < 1:
            raise ValueError(f"rsample: the number of samples must be >= 1, got {sample_shape}")
        return torch.Size((sample_shape,))
    return torch.Size(sample_shape)


def _flatten_samples(z: Tensor, event_and_batch_ndim: int) -> tuple[Tensor, torch.Size]:
    """View ``z [*sample, *batch, d]`` as ``[K, *batch, d]`` (K = prod(sample), 1 if none)."""
    sample = z.shape[:z.dim() - event_and_batch_ndim]
    return z.reshape(-1, *z.shape[len(sample):]), sample


class DiagGaussian(Distribution):
    """``N(mu, diag(exp(logvar)))`` with reparameterised sampling.

    Args:
        mu, logvar: ``[*batch, d]``, one dtype and device.
    """
    arg_constraints = {"mu": constraints.real, "logvar": constraints.real}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, mu: Tensor, logvar: Tensor):
        if not isinstance(mu, Tensor) or not isinstance(logvar, Tensor):
            raise TypeError("DiagGaussian: mu and logvar must be tensors")
        if mu.dim() < 1 or mu.shape != logvar.shape:
            raise ValueError(f"DiagGaussian: mu has shape {list(mu.shape)} and logvar "
                             f"{list(logvar.shape)}; expected equal shapes [*batch, d]")
        self.mu, self.logvar = mu, logvar
        super().__init__(batch_shape=mu.shape[:-1], event_shape=mu.shape[-1:],
                         validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self.mu

    @property
    def variance(self) -> Tensor:
        return torch.exp(self.logvar)

    @property
    def stddev(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self, sample_shape=1) -> Tensor:
        """Reparameterised samples ``mu + exp(logvar / 2) ε``: ``[*sample_shape, *batch, d]``
        (``[K, *batch, d]`` for an int K)."""
        shape = _sample_shape(sample_shape) + self.mu.shape
        eps = torch.randn(shape, dtype=self.mu.dtype, device=self.mu.device)
        return self.mu + self.stddev * eps

    def sample(self, sample_shape=1) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """``log q(z)`` summed over d: z ``[*sample, *batch, d]`` (batch axes may be 1 where
        they broadcast) -> ``[*sample, *batch]``, float32 (float64 for float64 parameters)."""
        flat, sample = _flatten_samples(z.to(self.mu.dtype), self.mu.dim())
        out = ops.gaussian_log_prob(flat, self.mu, self.logvar)
        return out.reshape(*sample, *out.shape[1:])

    def entropy(self) -> Tensor:
        d = self.mu.shape[-1]
        return 0.5 * (d * (1.0 + math.log(2.0 * math.pi)) + self.logvar.sum(-1))

    def detach(self) -> "DiagGaussian":
        """The same distribution with parameters cut from the graph (for stop-gradient rules)."""
        return DiagGaussian(self.mu.detach(), self.logvar.detach())

    def __getitem__(self, index) -> "DiagGaussian":
        index = index if isinstance(index, tuple) else (index,)
        return DiagGaussian(self.mu[index], self.logvar[index])

    def __repr__(self) -> str:
        return f"DiagGaussian(batch_shape={list(self.batch_shape)}, d={self.mu.shape[-1]})"


class DiagGaussianMixture(Distribution):
    """``Σ_c softmax(logits)_c N(mu_c, diag(exp(logvar_c)))`` per batch element.

    Args:
        logits: ``[*batch, C]`` unnormalised component weights (``-inf`` switches a component
            off; at least one must be finite).
        mu, logvar: ``[*batch, C, d]``.

    Sampling draws the component of every sample from the mixture weights (Gumbel-max, so each
    sample is an exact draw of the mixture) and then reparameterises the chosen Gaussian.
    Gradients therefore reach the chosen component's ``mu`` and ``logvar`` through the sample,
    but the mixture *weights* get no gradient through the sample (the draw is discrete): they
    learn only through the log-densities in which they appear (``log_prob`` calls that are not
    detached). ``log_prob`` is the exact mixture density (a log-sum-exp over the components).
    """
    arg_constraints = {"logits": constraints.real, "mu": constraints.real,
                       "logvar": constraints.real}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, logits: Tensor, mu: Tensor, logvar: Tensor):
        if mu.dim() < 2 or mu.shape != logvar.shape or logits.shape != mu.shape[:-1]:
            raise ValueError(f"DiagGaussianMixture: logits {list(logits.shape)}, mu "
                             f"{list(mu.shape)}, logvar {list(logvar.shape)}; expected logits "
                             "[*batch, C] and mu, logvar [*batch, C, d]")
        self.logits, self.mu, self.logvar = logits, mu, logvar
        super().__init__(batch_shape=mu.shape[:-2], event_shape=mu.shape[-1:],
                         validate_args=False)

    @property
    def num_components(self) -> int:
        return self.mu.shape[-2]

    @property
    def weights(self) -> Tensor:
        """``[*batch, C]`` mixture probabilities."""
        return torch.softmax(self.logits, dim=-1)

    @property
    def mean(self) -> Tensor:
        return (self.weights.unsqueeze(-1) * self.mu).sum(dim=-2)

    @property
    def variance(self) -> Tensor:
        w = self.weights.unsqueeze(-1)
        second = (w * (torch.exp(self.logvar) + self.mu ** 2)).sum(dim=-2)
        return second - self.mean ** 2

    def rsample(self, sample_shape=1) -> Tensor:
        """``[*sample_shape, *batch, d]``: component from the weights, then reparameterised."""
        shape = _sample_shape(sample_shape)
        logits = self.logits.detach()
        u = torch.rand(shape + logits.shape, dtype=logits.dtype, device=logits.device)
        tiny = torch.finfo(logits.dtype).tiny
        gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))
        component = (logits + gumbel).argmax(dim=-1)                    # [*sample, *batch]
        d = self.mu.shape[-1]
        index = component[..., None, None].expand(*component.shape, 1, d)
        mu = self.mu.expand(*shape, *self.mu.shape).gather(-2, index).squeeze(-2)
        logvar = self.logvar.expand(*shape, *self.logvar.shape).gather(-2, index).squeeze(-2)
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def sample(self, sample_shape=1) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        """Exact ``log Σ_c π_c N(z; mu_c, exp(logvar_c))``: z ``[*sample, *batch, d]`` ->
        ``[*sample, *batch]``."""
        flat, sample = _flatten_samples(z.to(self.mu.dtype), self.mu.dim() - 1)
        per_component = ops.gaussian_log_prob(flat.unsqueeze(-2), self.mu, self.logvar)
        log_weights = torch.log_softmax(self.logits, dim=-1).to(per_component.dtype)
        out = torch.logsumexp(per_component + log_weights, dim=-1)
        return out.reshape(*sample, *out.shape[1:])

    def detach(self) -> "DiagGaussianMixture":
        return DiagGaussianMixture(self.logits.detach(), self.mu.detach(), self.logvar.detach())

    def __getitem__(self, index) -> "DiagGaussianMixture":
        index = index if isinstance(index, tuple) else (index,)
        return DiagGaussianMixture(self.logits[index], self.mu[index], self.logvar[index])

    def __repr__(self) -> str:
        return (f"DiagGaussianMixture(batch_shape={list(self.batch_shape)}, "
                f"components={self.num_components}, d={self.mu.shape[-1]})")
