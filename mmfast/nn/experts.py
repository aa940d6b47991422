"""Expert aggregators (METHOD.md): product (PoE) and mixture (MoE) of per-modality Gaussian
experts, and their "+" variants with a learned per-token MLP in front.

The features of modality m are its expert's parameters ``h_m = [mu_m, logvar_m]`` (so
``feature_dim = 2 * latent_dim``); the "+" variants first map any ``h_m`` through one MLP
shared by all modalities (a per-modality MLP with modality-specific weights would break the
invariance to the order of the modalities).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfast import ops
from mmfast.distributions import DiagGaussian, DiagGaussianMixture
from mmfast.nn._common import check_inputs, zero_unused
from mmfast.nn.mlp import MLP

__all__ = ["PoE", "MoE", "PoEPlus", "MoEPlus"]


def _experts(features: Tensor, latent_dim: int) -> tuple[Tensor, Tensor]:
    mu, logvar = features.split(latent_dim, dim=-1)
    return mu.contiguous(), logvar.contiguous()


class PoE(nn.Module):
    """Product of the experts in S, with an N(0, I) prior expert by default
    (:func:`mmfast.ops.gaussian_poe`); an empty subset gives the prior.

    Args:
        feature_dim: must be ``2 * latent_dim`` (features are ``[mu, logvar]``).
        latent_dim: d.
        prior_expert: include the N(0, I) expert (default True).
    forward(features [B, M, 2d], mask [B, M] or [B, S, M]) -> DiagGaussian, batch [B] or [B, S].
    """

    def __init__(self, feature_dim: int, latent_dim: int, prior_expert: bool = True):
        super().__init__()
        if feature_dim != 2 * latent_dim:
            raise ValueError(f"{type(self).__name__}: feature_dim must be 2 * latent_dim = "
                             f"{2 * latent_dim} (features are [mu, logvar]), got {feature_dim}")
        self.feature_dim, self.latent_dim, self.prior_expert = feature_dim, latent_dim, prior_expert

    def _expert_features(self, features: Tensor) -> Tensor:
        return features

    def forward(self, features: Tensor, mask: Tensor) -> DiagGaussian:
        check_inputs(type(self).__name__, features, mask, self.feature_dim)
        expert = self._expert_features(zero_unused(features, mask))
        mu, logvar = _experts(expert, self.latent_dim)
        return DiagGaussian(*ops.gaussian_poe(mu, logvar, mask, prior=self.prior_expert))


class MoE(nn.Module):
    """Uniform mixture of the experts in S; an empty subset gives the prior N(0, I).

    The posterior is a :class:`~mmfast.distributions.DiagGaussianMixture` with M + 1
    components: the M experts (weight 1/|S| for members, off otherwise) and N(0, I), on only
    for the empty subset. Its parameters are shared by the subsets of a bank (stride-0 views).

    Args: feature_dim (= 2 * latent_dim), latent_dim.
    forward(features [B, M, 2d], mask [B, M] or [B, S, M]) -> mixture, batch [B] or [B, S].
    """

    def __init__(self, feature_dim: int, latent_dim: int):
        super().__init__()
        if feature_dim != 2 * latent_dim:
            raise ValueError(f"{type(self).__name__}: feature_dim must be 2 * latent_dim = "
                             f"{2 * latent_dim} (features are [mu, logvar]), got {feature_dim}")
        self.feature_dim, self.latent_dim = feature_dim, latent_dim

    def _expert_features(self, features: Tensor) -> Tensor:
        return features

    def forward(self, features: Tensor, mask: Tensor) -> DiagGaussianMixture:
        check_inputs(type(self).__name__, features, mask, self.feature_dim)
        expert = self._expert_features(zero_unused(features, mask))
        mu, logvar = _experts(expert, self.latent_dim)                  # [B, M, d]
        B, M, d = mu.shape
        zeros = mu.new_zeros(B, 1, d)
        comp_mu, comp_logvar = torch.cat([mu, zeros], 1), torch.cat([logvar, zeros], 1)
        member = mask if mask.dim() == 3 else mask.unsqueeze(1)          # [B, S, M]
        empty = ~member.any(dim=-1, keepdim=True)                       # [B, S, 1]
        on = torch.cat([member, empty], dim=-1)                          # [B, S, M + 1]
        off = torch.tensor(float("-inf"), dtype=mu.dtype, device=mu.device)
        logits = torch.where(on, torch.zeros((), dtype=mu.dtype, device=mu.device), off)
        S = member.shape[1]
        comp_mu = comp_mu.unsqueeze(1).expand(B, S, M + 1, d)
        comp_logvar = comp_logvar.unsqueeze(1).expand(B, S, M + 1, d)
        if mask.dim() == 2:
            logits, comp_mu, comp_logvar = logits[:, 0], comp_mu[:, 0], comp_logvar[:, 0]
        return DiagGaussianMixture(logits, comp_mu, comp_logvar)


class _PlusMixin:
    def _plus_init(self, feature_dim: int, latent_dim: int, hidden: int, num_layers: int,
                   activation: type[nn.Module]) -> None:
        self.feature_dim = feature_dim
        self.chi = MLP(feature_dim, 2 * latent_dim, [hidden] * num_layers, activation)

    def _expert_features(self, features: Tensor) -> Tensor:
        return self.chi(features)


class PoEPlus(_PlusMixin, PoE):
    """PoE after a learned MLP ``[mu_m, logvar_m] = χ(h_m)`` shared by the modalities, of the
    SumPooling χ size (METHOD.md, mmfast choice). Any feature_dim.

    Args: feature_dim, latent_dim, hidden (256), num_layers (2), prior_expert (True), activation.
    """

    def __init__(self, feature_dim: int, latent_dim: int, hidden: int = 256, num_layers: int = 2,
                 prior_expert: bool = True, activation: type[nn.Module] = nn.LeakyReLU):
        PoE.__init__(self, 2 * latent_dim, latent_dim, prior_expert)
        self._plus_init(feature_dim, latent_dim, hidden, num_layers, activation)


class MoEPlus(_PlusMixin, MoE):
    """MoE after a learned MLP ``[mu_m, logvar_m] = χ(h_m)`` shared by the modalities.

    Args: feature_dim, latent_dim, hidden (256), num_layers (2), activation.
    """

    def __init__(self, feature_dim: int, latent_dim: int, hidden: int = 256, num_layers: int = 2,
                 activation: type[nn.Module] = nn.LeakyReLU):
        MoE.__init__(self, 2 * latent_dim, latent_dim)
        self._plus_init(feature_dim, latent_dim, hidden, num_layers, activation)
