"""SelfAttention aggregators (METHOD.md): modality tokens, L pre-LayerNorm attention blocks in
which only the tokens of the subset attend and are attended to, a final LayerNorm, the masked
sum, then ρ."""
from __future__ import annotations

from torch import Tensor, nn

from mmfast import ops
from mmfast.nn._common import MixtureRhoHead, RhoHead, check_inputs, zero_unused
from mmfast.nn.mlp import MLP

__all__ = ["AttentionBlock", "SelfAttention", "SelfAttentionMixture"]


def _flat_subsets(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, S, M, W]`` tokens of a bank and their ``[B, S, M]`` mask as ``B·S`` rows."""
    B, S, M, W = tokens.shape
    return tokens.reshape(B * S, M, W), mask.reshape(B * S, M)


class AttentionBlock(nn.Module):
    """Pre-LayerNorm block: ``x + Attn(LN(x))``, then ``x + FFN(LN(x))``, attention restricted
    to each subset through :func:`mmfast.ops.subset_attention`.

    forward(tokens ``[B, M, W]`` (subset-independent) or ``[B, S, M, W]`` (per subset), mask
    ``[B, M]`` or ``[B, S, M]``) -> ``[B, (S,) M, W]``. On ``[B, M, W]`` tokens the LayerNorm and
    the projections run once per token and the bank is handled inside the attention op.
    """

    def __init__(self, width: int, num_heads: int = 4, ffn_hidden: int | None = None,
                 activation: type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"AttentionBlock: width {width} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = MLP(width, width, [ffn_hidden or width], activation)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if tokens.dim() == 4:
            flat, flat_mask = _flat_subsets(tokens, mask)
            attended = self._attend(flat, flat_mask).reshape(tokens.shape)
            x = tokens
        else:
            attended = self._attend(tokens, mask)                      # [B, (S,) M, W]
            x = tokens.unsqueeze(1) if mask.dim() == 3 else tokens
        x = x + self.proj(attended)
        return x + self.ffn(self.norm_ffn(x))

    def _attend(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = (t.contiguous() for t in self.qkv(self.norm_attn(x)).chunk(3, dim=-1))
        return ops.subset_attention(q, k, v, mask, self.num_heads)


class SelfAttention(RhoHead, nn.Module):
    """``e_m = MLP(h_m)``; ``depth`` pre-LN attention blocks over the tokens of S; LayerNorm;
    ``Σ_{m∈S}``; ρ -> DiagGaussian. Paper code defaults: one block, 4 heads, width 256.

    Args:
        feature_dim: E; latent_dim: d.
        width: token width W (divisible by num_heads).
        num_heads, depth: attention heads and number of blocks.
        hidden: hidden width of the token MLP, the FFN and ρ; num_layers: hidden layers of ρ.
    forward(features [B, M, E], mask [B, M] or [B, S, M]) -> posterior, batch [B] or [B, S].
    The token MLP and the first block's LayerNorm and projections run once per modality and
    sample; later blocks run per subset because the tokens then depend on it.
    """

    def __init__(self, feature_dim: int, latent_dim: int, width: int = 256, num_heads: int = 4,
                 depth: int = 1, hidden: int = 256, num_layers: int = 2,
                 activation: type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        self.feature_dim, self.latent_dim = feature_dim, latent_dim
        self.embed = MLP(feature_dim, width, [hidden], activation)
        self.blocks = nn.ModuleList(AttentionBlock(width, num_heads, hidden, activation)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self._build_rho(width, hidden, num_layers, activation)

    def forward(self, features: Tensor, mask: Tensor):
        check_inputs(type(self).__name__, features, mask, self.feature_dim)
        tokens = self.embed(zero_unused(features, mask))               # [B, M, W], once
        for block in self.blocks:
            tokens = block(tokens, mask)
        tokens = self.norm(tokens)
        if tokens.dim() == 4:                                          # per-subset tokens
            flat, flat_mask = _flat_subsets(tokens, mask)
            pooled = ops.subset_sum_pool(flat, flat_mask).reshape(*mask.shape[:2], -1)
        else:
            pooled = ops.subset_sum_pool(tokens, mask)
        return self._head(self.rho(self.rho_in(pooled)))


class SelfAttentionMixture(MixtureRhoHead, SelfAttention):
    """SelfAttention whose ρ outputs a C-component diagonal Gaussian mixture. Options as
    :class:`SelfAttention`, plus ``components`` (default 5)."""

    def __init__(self, feature_dim: int, latent_dim: int, components: int = 5, **options):
        self.components = components
        super().__init__(feature_dim, latent_dim, **options)
