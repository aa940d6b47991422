"""Exact diagnostics of a model trained on :class:`mmfast.data.LinearGaussian`.

The model's decoders are linear Gaussian, ``p_θ(x_m|z) = N(W_m z + b_m, σ² I)``, so its marginals
and posteriors are known in closed form (:mod:`mmfast.data.linear_gaussian`):

* relative LLH gap ``(Σ_i log p_θ(x_i) − Σ_i L(x_i)) / |Σ_i log p_θ(x_i)|``, where ``L`` is the
  objective (masked or mixture, K importance samples) averaged over every subset S of the
  modalities (ρ(S) is uniform over them, the empty set included) at one draw of z each;
* ``KL(q(z|x_S) ‖ p_θ(z|x_S))`` for the full set and each single modality, averaged over the
  data: in closed form for a diagonal Gaussian q, by Monte Carlo (``kl_samples`` draws) for a
  mixture q (MoE); ``kl_exact`` says which.
"""
from __future__ import annotations

import torch
from torch.distributions import MultivariateNormal

from mmfast.data.base import iterate_batches
from mmfast.data.linear_gaussian import (gaussian_kl_to_full, linear_gaussian_log_marginal,
                                         linear_gaussian_posterior)
from mmfast.subsets import all_subsets


def _diag_params(q):
    """(mean, var) of a diagonal Gaussian posterior object, or None for other families."""
    if hasattr(q, "logits"):  # a mixture (MoE, *Mixture aggregators)
        return None
    for mu_name, lv_name in (("mu", "logvar"), ("loc", "logvar")):
        if hasattr(q, mu_name) and hasattr(q, lv_name):
            mu, lv = getattr(q, mu_name), getattr(q, lv_name)
            if torch.is_tensor(mu) and torch.is_tensor(lv) and mu.shape == lv.shape:
                return mu, lv.exp()
    return None


def _kl(q, p_mean, p_precision, kl_samples: int) -> tuple[torch.Tensor, bool]:
    params = _diag_params(q)
    if params is not None:
        return gaussian_kl_to_full(params[0], params[1], p_mean, p_precision), True
    z = q.rsample(kl_samples)                                            # [K, B, d]
    log_q = q.log_prob(z).double()
    p = MultivariateNormal(p_mean, precision_matrix=p_precision)
    return (log_q - p.log_prob(z.double())).mean(0), False


@torch.no_grad()
def linear_gaussian_report(model, data, decoders, noise_std: float, posterior_fn, kind: str,
                           num_samples: int = 1, batch_size: int = 500, device="cpu",
                           kl_samples: int = 256) -> dict[str, float]:
    """Gap and KLs of ``model`` on ``data`` (see the module doc).

    Args:
        decoders: the model's ``nn.Linear`` decoders in modality order (``W = weight``,
            ``b = bias``); noise_std: their fixed σ.
        posterior_fn: ``posterior_fn(x, mask [B, M]) -> q(z|x_S)`` of the model.
        kind: the objective ("masked" | "mixture"); num_samples: its K.
    Returns:
        ``{"gap": ..., "exact_llh": ..., "objective": ..., "kl_full": ..., "kl_<name>": ...,
        "kl_single": mean over modalities, "kl_exact": 1.0 | 0.0}`` (per-sample means for
        the LLH and objective).
    """
    names = list(data.modality_names)
    M = len(names)
    W = [dec.weight.detach().double().to(device) for dec in decoders]
    b = [dec.bias.detach().double().to(device) for dec in decoders]
    bank = all_subsets(M, include_empty=True, device=device)             # [2^M, M]
    exact_sum = objective_sum = 0.0
    n = 0
    kl_sums = dict.fromkeys(["full", *names], 0.0)
    exact_kl = True
    for batch in iterate_batches(data, batch_size, device):
        x, observed = batch["x"], batch["observed"]
        B = observed.shape[0]
        xs = [x[name] for name in names]
        exact_sum += float(linear_gaussian_log_marginal(xs, observed, W, b, noise_std).sum())
        value = model.objective(x, observed=observed, subset=bank.expand(B, *bank.shape) & observed[:, None],
                                kind=kind, num_samples=num_samples).value        # [B, 2^M]
        objective_sum += float(value.double().mean(1).sum())
        n += B
        masks = {"full": observed}
        for m, name in enumerate(names):
            single = torch.zeros_like(observed)
            single[:, m] = True
            masks[name] = single
        for key, mask in masks.items():
            p_mean, p_precision = linear_gaussian_posterior(xs, mask, W, b, noise_std)
            kl, closed = _kl(posterior_fn(x, mask), p_mean, p_precision, kl_samples)
            exact_kl &= closed
            kl_sums[key] += float(kl.sum())
    out = {"gap": (exact_sum - objective_sum) / abs(exact_sum), "exact_llh": exact_sum / n,
           "objective": objective_sum / n, "kl_full": kl_sums["full"] / n}
    for name in names:
        out[f"kl_{name}"] = kl_sums[name] / n
    out["kl_single"] = sum(kl_sums[name] for name in names) / (n * M)
    out["kl_exact"] = 1.0 if exact_kl else 0.0
    return out
