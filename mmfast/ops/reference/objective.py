"""Reference Gaussian terms of the masked and mixture objectives (METHOD.md).

Two parts, because the mixture objective needs only the first:

* subset part: ``z_S = μ_S + exp(logvar_S / 2) ε_S``, ``log q(z_S | x_S)`` and ``log p(z_S)``;
* full part: ``z = μ + exp(logvar / 2) ε``, ``log q(z | x)`` and ``log q(z | x_S)``.

Stop-gradient ("sticking the landing", ``stl=True``): ``log q(z_S|x_S)`` and ``log q(z|x)`` see
detached distribution parameters, so their gradient reaches the encoders only through the
sample; ``log q(z|x_S)`` at the full sample and ``log p(z_S)`` are never detached.
"""
from __future__ import annotations

import torch

from mmfast.ops.reference.densities import gaussian_log_prob, mixture_log_prob


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mu + exp(logvar / 2) * eps``; eps ``[K, *batch, d]``, result in eps's shape."""
    return mu + torch.exp(0.5 * logvar) * eps


def subset_terms(mu_s: torch.Tensor, logvar_s: torch.Tensor, eps_s: torch.Tensor,
                 prior_logits: torch.Tensor | None = None, prior_mu: torch.Tensor | None = None,
                 prior_logvar: torch.Tensor | None = None, stl: bool = True):
    """Args: mu_s, logvar_s ``[*batch, d]``; eps_s ``[K, *batch, d]``; the mixture prior
    (logits ``[C]``, mu/logvar ``[C, d]``) or None for N(0, I).
    Returns ``(z_s [K, *batch, d], log_q_s [K, *batch], log_p_s [K, *batch])``."""
    z_s = reparameterize(mu_s, logvar_s, eps_s)
    q_mu, q_logvar = (mu_s.detach(), logvar_s.detach()) if stl else (mu_s, logvar_s)
    log_q_s = gaussian_log_prob(z_s, q_mu, q_logvar)
    if prior_logits is None:
        zero = torch.zeros((), dtype=z_s.dtype, device=z_s.device)
        log_p_s = gaussian_log_prob(z_s, zero, zero)
    else:
        log_p_s = mixture_log_prob(z_s, prior_logits, prior_mu, prior_logvar)
    return z_s, log_q_s, log_p_s


def full_terms(mu_f: torch.Tensor, logvar_f: torch.Tensor, eps_f: torch.Tensor,
               mu_s: torch.Tensor, logvar_s: torch.Tensor, stl: bool = True):
    """Args: mu_f, logvar_f ``[B, d]``; eps_f ``[K, B, d]``; mu_s, logvar_s ``[B, d]`` or
    ``[B, S, d]`` (a subset bank: the one full sample is scored under every subset's q).
    Returns ``(z [K, B, d], log_q_f [K, B], log_q_fs [K, B] or [K, B, S])``."""
    z = reparameterize(mu_f, logvar_f, eps_f)
    q_mu, q_logvar = (mu_f.detach(), logvar_f.detach()) if stl else (mu_f, logvar_f)
    log_q_f = gaussian_log_prob(z, q_mu, q_logvar)
    z_at_s = z.unsqueeze(-2) if mu_s.dim() == 3 else z
    log_q_fs = gaussian_log_prob(z_at_s, mu_s, logvar_s)
    return z, log_q_f, log_q_fs
