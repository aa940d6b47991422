"""SumPooling aggregators (METHOD.md): ``q(z | x_S) = ρ(Σ_{m∈S} χ(h_m))``."""
from __future__ import annotations

from torch import Tensor, nn

from mmfast import ops
from mmfast.nn._common import MixtureRhoHead, RhoHead, check_inputs, zero_unused
from mmfast.nn.mlp import MLP

__all__ = ["SumPooling", "SumPoolingMixture"]


class SumPooling(RhoHead, nn.Module):
    """Permutation-invariant pooling: ``ρ(Σ_{m∈S} χ(h_m))`` -> DiagGaussian.

    χ runs once per modality and sample, whatever the subsets; only the masked sum (and ρ)
    differ between the subsets of a ``[B, S, M]`` bank. ρ's first Linear is ``rho_in``, kept
    apart so that a bank can move it inside the sum (``W Σ g_m = Σ W g_m``).

    Args:
        feature_dim: E, the width of the modality features h_m.
        latent_dim: d.
        hidden: width of the hidden layers of χ and ρ (paper code: 256).
        num_layers: hidden layers in χ and in ρ (paper code: 2).
        pool_dim: width of χ's output, the pooled space (default: hidden).
        activation: nonlinearity class (paper code: leaky ReLU).
    forward(features [B, M, E], mask bool [B, M] or [B, S, M]) -> posterior, batch [B] or [B, S].
    """

    def __init__(self, feature_dim: int, latent_dim: int, hidden: int = 256, num_layers: int = 2,
                 pool_dim: int | None = None, activation: type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"{type(self).__name__}: num_layers must be >= 1, got {num_layers}")
        self.feature_dim, self.latent_dim = feature_dim, latent_dim
        pool_dim = pool_dim or hidden
        self.chi = MLP(feature_dim, pool_dim, [hidden] * num_layers, activation)
        self._build_rho(pool_dim, hidden, num_layers, activation)

    def pool_rho_in(self, g: Tensor, mask: Tensor) -> Tensor:
        """``rho_in(Σ_{m∈S} g_m)``: g ``[B, M, P]`` -> ``[B, (S,) hidden]``.

        For a bank of more subsets than modalities (S > M) the M rows are transformed once and
        pooled afterwards (``ops.subset_pool_linear``), instead of transforming S pooled rows.
        """
        if mask.dim() == 3 and mask.shape[1] > mask.shape[2]:
            return ops.subset_pool_linear(g, mask, self.rho_in.weight, self.rho_in.bias)
        return self.rho_in(ops.subset_sum_pool(g, mask))

    def forward(self, features: Tensor, mask: Tensor):
        check_inputs(type(self).__name__, features, mask, self.feature_dim)
        g = self.chi(zero_unused(features, mask))                      # once per modality
        return self._head(self.rho(self.pool_rho_in(g, mask)))


class SumPoolingMixture(MixtureRhoHead, SumPooling):
    """SumPooling whose ρ outputs a C-component diagonal Gaussian mixture (C logits, C means,
    C logvars). Options as :class:`SumPooling`, plus ``components`` (default 5)."""

    def __init__(self, feature_dim: int, latent_dim: int, components: int = 5, **options):
        self.components = components
        super().__init__(feature_dim, latent_dim, **options)
