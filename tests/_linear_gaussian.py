"""A linear-Gaussian multi-modal model with orthonormal loading columns per modality, its exact
encoders (test fixtures for the model tests), and closed-form densities written from the maths.

``x_m = W_m z + b_m + N(0, I)``, ``z ~ N(0, I_d)``; modality m loads a private block of latents
and the shared block, with orthonormal columns, so ``W_mᵀ W_m = diag(active_m)`` and the true
posterior of every subset is diagonal: precision ``1 + Σ_{m∈S} active_m``, mean
``Σ_{m∈S} W_mᵀ (x_m − b_m) / precision``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributions import MultivariateNormal

import mmfast as mf

DT = torch.float64


class LinearGaussian:
    def __init__(self, dims=(4, 6, 5), private=2, shared=2, seed=0):
        gen = torch.Generator().manual_seed(seed)
        M = len(dims)
        self.d = d = M * private + shared
        self.dims, self.names = dims, [f"m{i}" for i in range(M)]
        self.W, self.b, self.active = [], [], []
        for m, D in enumerate(dims):
            cols = list(range(m * private, (m + 1) * private)) + list(range(M * private, d))
            q, _ = torch.linalg.qr(torch.randn(D, len(cols), generator=gen, dtype=DT))
            W = torch.zeros(D, d, dtype=DT)
            W[:, cols] = q
            active = torch.zeros(d, dtype=DT)
            active[cols] = 1.0
            self.W.append(W)
            self.b.append(torch.randn(D, generator=gen, dtype=DT))
            self.active.append(active)

    def sample(self, n, seed=1):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.d, generator=gen, dtype=DT)
        return {name: z @ W.T + b + torch.randn(n, W.shape[0], generator=gen, dtype=DT)
                for name, W, b in zip(self.names, self.W, self.b)}

    def log_marginal(self, x, subset):
        """log p(x_S) per row for a fixed subset (list of bools), from the joint Gaussian."""
        idx = [m for m, on in enumerate(subset) if on]
        if not idx:
            return torch.zeros(next(iter(x.values())).shape[0], dtype=DT)
        W = torch.cat([self.W[m] for m in idx])
        b = torch.cat([self.b[m] for m in idx])
        xs = torch.cat([x[self.names[m]] for m in idx], dim=1)
        cov = W @ W.T + torch.eye(W.shape[0], dtype=DT)
        return MultivariateNormal(b, covariance_matrix=cov).log_prob(xs)

    def posterior(self, x, subset):
        """Exact p(z | x_S) by the general matrix formulas: (mean [n, d], covariance [d, d])."""
        idx = [m for m, on in enumerate(subset) if on]
        prec = torch.eye(self.d, dtype=DT)
        lin = torch.zeros(next(iter(x.values())).shape[0], self.d, dtype=DT)
        for m in idx:
            prec = prec + self.W[m].T @ self.W[m]
            lin = lin + (x[self.names[m]] - self.b[m]) @ self.W[m]
        cov = torch.linalg.inv(prec)
        return lin @ cov, cov

    def model(self, representation="gaussian", prior=None):
        """MultiModalVAE with the exact encoders and aggregator, true decoders, scale 1.0."""
        modalities = {
            name: mf.Modality(ExactEncoder(W, b, a), LinearDecoder(W, b), "normal", scale=1.0)
            for name, W, b, a in zip(self.names, self.W, self.b, self.active)}
        prior = prior or mf.priors.StandardNormal(self.d)
        return mf.MultiModalVAE(modalities, ExactAggregator(self.d, representation), prior.double())


class ExactEncoder(nn.Module):
    """h_m = [W_mᵀ (x_m − b_m), active_m]: the expert of modality m in natural parameters."""

    def __init__(self, W, b, active):
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("b", b)
        self.register_buffer("active", active)

    def forward(self, x):
        return torch.cat([(x - self.b) @ self.W, self.active.expand(x.shape[0], -1)], dim=1)


class LinearDecoder(nn.Module):
    def __init__(self, W, b):
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("b", b)

    def forward(self, z):
        return z @ self.W.T + self.b


class ExactAggregator(nn.Module):
    """The true posterior of any subset (and any bank): sum the natural parameters, add the
    prior's unit precision. ``representation="mixture1"`` returns it as a one-component
    mixture, which sends the model down its generic (non-fused) path."""

    def __init__(self, d, representation="gaussian", variance_factor=1.0):
        super().__init__()
        self.d, self.representation, self.variance_factor = d, representation, variance_factor

    def forward(self, features, mask):
        pooled = mf.ops.subset_sum_pool(features, mask)
        lin, act = pooled.split(self.d, dim=-1)
        precision = 1.0 + act
        mu, logvar = lin / precision, -torch.log(precision) + torch.log(
            torch.tensor(self.variance_factor, dtype=precision.dtype))
        if self.representation == "gaussian":
            return mf.distributions.DiagGaussian(mu, logvar)
        return mf.distributions.DiagGaussianMixture(
            torch.zeros(*mu.shape[:-1], 1, dtype=mu.dtype), mu.unsqueeze(-2), logvar.unsqueeze(-2))
