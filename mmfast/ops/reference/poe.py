"""Reference Gaussian product of experts over modality subsets (METHOD.md: PoE)."""
from __future__ import annotations

import torch

from mmfast.ops.reference._common import acc_dtype, drop_subset_axis, in_any_subset, subset_axes


def gaussian_poe(mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor,
                 prior_mu: torch.Tensor | None = None,
                 prior_logvar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision-weighted product of the experts in each subset, times an optional prior expert.

    precision ``λ = Σ_{m∈S} exp(-logvar_m) [+ exp(-logvar_p)]``, mean
    ``(Σ_{m∈S} μ_m exp(-logvar_m) [+ μ_p exp(-logvar_p)]) / λ``, logvar ``-log λ``. Computed with
    a log-sum-exp over the experts' log-precisions so logvar in [-30, 30] stays finite. An empty
    product (empty subset, no prior) gives mu = 0, logvar = 0.

    Args:
        mu, logvar: ``[B, M, d]`` expert parameters.
        mask: bool ``[B, M]`` or ``[B, S, M]``.
        prior_mu, prior_logvar: ``[B, d]`` (broadcast views allowed) or both None (no prior).
    Returns:
        ``(mu, logvar)``, each ``[B, d]`` or ``[B, S, d]`` in ``mu.dtype``.
    """
    acc = acc_dtype(mu.dtype)
    observed = in_any_subset(mask).unsqueeze(-1)                      # [B, M, 1]
    mu_e = torch.where(observed, mu.to(acc), 0.0).unsqueeze(1)        # [B, 1, M, d]
    logprec = torch.where(observed, -logvar.to(acc), 0.0).unsqueeze(1)
    member = subset_axes(mask).unsqueeze(-1)                          # [B, S, M, 1]
    logprec = logprec.masked_fill(~member, float("-inf"))             # [B, S, M, d]
    mu_e = mu_e.expand(logprec.shape)
    if prior_mu is not None:
        S = logprec.shape[1]
        p_logprec = (-prior_logvar.to(acc))[:, None, None, :].expand(-1, S, 1, -1)
        p_mu = prior_mu.to(acc)[:, None, None, :].expand(-1, S, 1, -1)
        logprec = torch.cat([logprec, p_logprec], dim=2)
        mu_e = torch.cat([mu_e, p_mu], dim=2)
    log_total = torch.logsumexp(logprec, dim=2)                       # [B, S, d]; -inf if empty
    empty = torch.isinf(log_total) & (log_total < 0)
    safe_total = torch.where(empty, 0.0, log_total)
    weights = torch.exp(logprec - safe_total.unsqueeze(2))            # 0 for non-members
    out_mu = (weights * torch.where(torch.isinf(logprec), 0.0, mu_e)).sum(dim=2)
    out_logvar = -safe_total
    return (drop_subset_axis(out_mu, mask).to(mu.dtype),
            drop_subset_axis(out_logvar, mask).to(mu.dtype))
