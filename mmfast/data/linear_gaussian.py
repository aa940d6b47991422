"""The paper's linear Gaussian multi-modal model, with its exact marginals and posteriors.

Generator (METHOD.md, experiment 1): ``z ~ N(0, I_d)`` with ``d = M * private_dim + shared_dim``;
modality m sees its own private block of ``private_dim`` latents and the shared block of
``shared_dim`` latents: ``x_m = W_m z + b_m + N(0, σ² I)``, where the ``private_dim + shared_dim``
non-zero columns of ``W_m [D_m, d]`` are orthonormal and ``D_m`` is drawn in ``[30, 60)``.

Closed forms, for any linear-Gaussian decoder set ``(W_m, b_m, σ_m)`` (the generator's or a
learned one) and any subset S:

* posterior ``p(z|x_S) = N(μ_S, Λ_S^{-1})`` with ``Λ_S = I + Σ_{m∈S} W_mᵀW_m / σ_m²`` and
  ``μ_S = Λ_S^{-1} Σ_{m∈S} W_mᵀ(x_m − b_m) / σ_m²``;
* marginal by Bayes' rule at ``z = μ_S``:
  ``log p(x_S) = Σ_{m∈S} log N(x_m; W_m μ_S + b_m, σ_m²) + log N(μ_S; 0, I) − log N(μ_S; μ_S, Λ_S^{-1})``,
  which is exact for any z and needs only d x d factorisations.

Everything is computed in float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mmfast.data.base import MultiModalData

_LOG_2PI = math.log(2.0 * math.pi)
_SPLITS = {"train": 0, "test": 1, "valid": 2}


def _stack_x(x, loadings) -> list[Tensor]:
    if isinstance(x, dict):
        x = list(x.values())
    if len(x) != len(loadings):
        raise ValueError(f"got {len(x)} modalities; the loadings have {len(loadings)}")
    return [t.to(torch.float64) for t in x]


def _subset_mask(subset, batch: int, M: int, device) -> Tensor:
    if subset is None:
        return torch.ones(batch, M, dtype=torch.bool, device=device)
    subset = torch.as_tensor(subset, device=device)
    if subset.dtype != torch.bool or subset.shape[-1] != M:
        raise ValueError(f"subset has shape {list(subset.shape)} and dtype {subset.dtype}; "
                         f"expected bool [{M}] or [B, {M}]")
    return subset.expand(batch, M) if subset.dim() == 1 else subset


def linear_gaussian_posterior(x, subset, loadings: Sequence[Tensor], biases: Sequence[Tensor],
                              noise_std) -> tuple[Tensor, Tensor]:
    """Exact posterior ``p(z | x_S)`` of a linear-Gaussian model.

    Args:
        x: list (or dict, in modality order) of ``[B, D_m]`` tensors.
        subset: bool ``[M]`` or ``[B, M]`` (None = all modalities).
        loadings: ``W_m [D_m, d]``; biases: ``b_m [D_m]``; noise_std: float or ``[M]``.
    Returns:
        ``(mean [B, d], precision [B, d, d])``, float64.
    """
    xs = _stack_x(x, loadings)
    B, M = xs[0].shape[0], len(loadings)
    device = xs[0].device
    mask = _subset_mask(subset, B, M, device).to(torch.float64)
    noise_var = torch.as_tensor(noise_std, dtype=torch.float64, device=device).expand(M) ** 2
    W = [w.to(device, torch.float64) for w in loadings]
    d = W[0].shape[1]
    gram = torch.stack([w.T @ w / v for w, v in zip(W, noise_var)])              # [M, d, d]
    precision = torch.eye(d, dtype=torch.float64, device=device) + torch.einsum("bm,mij->bij", mask, gram)
    info = sum(mask[:, m, None] * ((xs[m] - biases[m].to(device, torch.float64)) @ W[m]) / noise_var[m]
               for m in range(M))                                                  # [B, d]
    chol = torch.linalg.cholesky(precision)
    mean = torch.cholesky_solve(info.unsqueeze(-1), chol).squeeze(-1)
    return mean, precision


def linear_gaussian_log_marginal(x, subset, loadings, biases, noise_std) -> Tensor:
    """Exact ``log p(x_S)`` of a linear-Gaussian model: ``[B]`` float64 (see the module doc)."""
    xs = _stack_x(x, loadings)
    B, M = xs[0].shape[0], len(loadings)
    device = xs[0].device
    mask = _subset_mask(subset, B, M, device)
    mean, precision = linear_gaussian_posterior(xs, mask, loadings, biases, noise_std)
    noise_std = torch.as_tensor(noise_std, dtype=torch.float64, device=device).expand(M)
    d = mean.shape[-1]
    total = -0.5 * (mean ** 2).sum(-1) - 0.5 * d * _LOG_2PI                       # log p(μ_S)
    # log N(μ_S; μ_S, Λ^{-1}) = -d/2 log 2π + 1/2 log det Λ
    total = total - (-0.5 * d * _LOG_2PI + 0.5 * torch.logdet(precision))
    for m in range(M):
        W, b = loadings[m].to(device, torch.float64), biases[m].to(device, torch.float64)
        resid = xs[m] - mean @ W.T - b
        D = W.shape[0]
        ll = (-0.5 * (resid / noise_std[m]) ** 2).sum(-1) - D * torch.log(noise_std[m]) - 0.5 * D * _LOG_2PI
        total = total + torch.where(mask[:, m], ll, torch.zeros_like(ll))
    return total


def gaussian_kl_to_full(q_mean: Tensor, q_var: Tensor, p_mean: Tensor, p_precision: Tensor) -> Tensor:
    """``KL(N(q_mean, diag q_var) ‖ N(p_mean, p_precision^{-1}))`` in closed form: ``[B]`` float64.

    ``KL = ½[tr(Λ_p Σ_q) + (μ_p − μ_q)ᵀ Λ_p (μ_p − μ_q) − d − log det Λ_p − Σ log σ_q²]``.
    """
    q_mean, q_var = q_mean.to(torch.float64), q_var.to(torch.float64)
    d = q_mean.shape[-1]
    trace = (torch.diagonal(p_precision, dim1=-2, dim2=-1) * q_var).sum(-1)
    diff = (p_mean - q_mean).unsqueeze(-1)
    maha = (diff.transpose(-1, -2) @ p_precision @ diff).squeeze(-1).squeeze(-1)
    return 0.5 * (trace + maha - d - torch.logdet(p_precision) - torch.log(q_var).sum(-1))


class LinearGaussian(MultiModalData):
    """Samples of the paper's linear Gaussian model plus its true parameters and closed forms.

    Args:
        num_samples: N. num_modalities: M. private_dim, shared_dim: latent block sizes.
        dims: modality sizes ``D_m`` (default: drawn in ``[min_dim, max_dim)``).
        noise_std: σ. seed: seeds the parameters; the samples of each split use their own stream.
        split: "train", "test" or "valid": same parameters, independent samples.

    Attributes:
        loadings (list of ``W_m [D_m, d]``), biases (``b_m [D_m]``), noise_std, latent_dim,
        x (dict "x0".. -> ``[N, D_m]`` float32), extras["z"] (true latents ``[N, d]``).
    """

    def __init__(self, num_samples: int = 5000, num_modalities: int = 5, private_dim: int = 5,
                 shared_dim: int = 5, dims: Sequence[int] | None = None, min_dim: int = 30,
                 max_dim: int = 60, noise_std: float = 1.0, seed: int = 0, split: str = "train"):
        if split not in _SPLITS:
            raise ValueError(f"LinearGaussian: split must be one of {sorted(_SPLITS)}, got {split!r}")
        if num_modalities < 1 or private_dim < 0 or shared_dim < 0 or private_dim + shared_dim < 1:
            raise ValueError("LinearGaussian: need num_modalities >= 1 and private_dim + shared_dim >= 1")
        M = num_modalities
        gen = torch.Generator().manual_seed(seed)
        if dims is None:
            dims = torch.randint(min_dim, max_dim, (M,), generator=gen).tolist()
        dims = [int(D) for D in dims]
        if len(dims) != M or min(dims) < private_dim + shared_dim:
            raise ValueError(f"LinearGaussian: dims {dims} must give {M} sizes, each >= "
                             f"private_dim + shared_dim = {private_dim + shared_dim}")
        d = M * private_dim + shared_dim
        loadings, biases = [], []
        for m, D in enumerate(dims):
            cols = list(range(m * private_dim, (m + 1) * private_dim)) + list(range(M * private_dim, d))
            q, r = torch.linalg.qr(torch.randn(D, len(cols), generator=gen, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))       # a unique Q, so the seed fixes the model
            W = torch.zeros(D, d, dtype=torch.float64)
            W[:, cols] = q
            loadings.append(W)
            biases.append(torch.randn(D, generator=gen, dtype=torch.float64))
        self.loadings, self.biases = loadings, biases
        self.noise_std = float(noise_std)
        self.latent_dim, self.private_dim, self.shared_dim = d, private_dim, shared_dim
        self.dims = dims
        sample_gen = torch.Generator().manual_seed(seed * 1009 + 7919 * (_SPLITS[split] + 1))
        z = torch.randn(num_samples, d, generator=sample_gen, dtype=torch.float64)
        x = {}
        for m, (W, b) in enumerate(zip(loadings, biases)):
            noise = torch.randn(num_samples, W.shape[0], generator=sample_gen, dtype=torch.float64)
            x[f"x{m}"] = (z @ W.T + b + self.noise_std * noise).to(torch.float32)
        super().__init__(x, extras={"z": z.to(torch.float32)})

    def posterior(self, x=None, subset=None) -> tuple[Tensor, Tensor]:
        """Exact ``p(z | x_S)``: ``(mean [B, d], precision [B, d, d])`` (default x: the data)."""
        return linear_gaussian_posterior(self.x if x is None else x, subset, self.loadings,
                                         self.biases, self.noise_std)

    def log_marginal(self, x=None, subset=None) -> Tensor:
        """Exact ``log p(x_S)`` ``[B]`` float64 (default x: the data, subset: all)."""
        return linear_gaussian_log_marginal(self.x if x is None else x, subset, self.loadings,
                                            self.biases, self.noise_std)
