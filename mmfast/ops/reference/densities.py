"""Reference log-densities of diagonal Gaussians and Gaussian mixtures over latents."""
from __future__ import annotations

import torch

from mmfast.ops.reference._common import LOG_2PI, acc_dtype


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``log N(z; mu, exp(logvar))`` summed over the last axis.

    Args:
        z: ``[K, *batch, d]``; mu, logvar: ``[*batch, d]`` (broadcastable against ``z[k]``).
    Returns:
        ``[K, *batch]`` in the accumulation dtype (float32, or float64 for float64 inputs).
    """
    acc = acc_dtype(z.dtype)
    z, mu, logvar = z.to(acc), mu.to(acc), logvar.to(acc)
    sq = (z - mu) ** 2 * torch.exp(-logvar)
    return -0.5 * (LOG_2PI + logvar + sq).sum(dim=-1)


def mixture_log_prob(z: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor,
                     logvar: torch.Tensor) -> torch.Tensor:
    """``log Σ_c softmax(logits)_c N(z; mu_c, exp(logvar_c))``.

    Args:
        z: ``[K, *batch, d]``; logits: ``[C]``; mu, logvar: ``[C, d]``.
    Returns:
        ``[K, *batch]`` in the accumulation dtype.
    """
    acc = acc_dtype(z.dtype)
    zc = z.to(acc).unsqueeze(-2)                                       # [K, *batch, 1, d]
    mu, logvar = mu.to(acc), logvar.to(acc)
    comp = -0.5 * (LOG_2PI + logvar + (zc - mu) ** 2 * torch.exp(-logvar)).sum(dim=-1)
    return torch.logsumexp(comp + torch.log_softmax(logits.to(acc), dim=-1), dim=-1)
