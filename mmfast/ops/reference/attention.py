"""Reference masked multi-head self-attention over modality tokens (METHOD.md: SelfAttention)."""
from __future__ import annotations

import torch

from mmfast.ops.reference._common import acc_dtype, drop_subset_axis, in_any_subset, subset_axes


def subset_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in which only the tokens of a subset attend and are attended to.

    The scores ``q kᵀ · scale`` of a sample are computed once and shared by all its subsets;
    each subset masks the keys outside it, takes a softmax in float32 or better (a row with no
    keys gives zeros, never NaN) and zeroes the rows of query tokens outside it.

    Args:
        q, k, v: ``[B, M, E]``, E divisible by num_heads.
        mask: bool ``[B, M]`` or ``[B, S, M]``.
    Returns:
        ``out``: ``[B, M, E]`` or ``[B, S, M, E]`` in ``q.dtype``;
        ``lse``: ``[B, H, M]`` or ``[B, S, H, M]`` in the accumulation dtype: the log-sum-exp of
        each row's masked scores (0 for a row whose subset is empty), saved for kernels'
        backward passes.
    """
    B, M, E = q.shape
    H = num_heads
    acc = acc_dtype(q.dtype)
    observed = in_any_subset(mask).unsqueeze(-1)                       # [B, M, 1]

    def heads(t: torch.Tensor) -> torch.Tensor:                        # [B, H, M, Dh]
        t = torch.where(observed, t.to(acc), 0.0)
        return t.reshape(B, M, H, E // H).transpose(1, 2)

    qh, kh, vh = heads(q), heads(k), heads(v)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale            # [B, H, M, M], once
    member = subset_axes(mask)                                         # [B, S, M]
    key_in = member[:, :, None, None, :]                               # [B, S, 1, 1, M]
    masked = scores.unsqueeze(1).masked_fill(~key_in, float("-inf"))   # [B, S, H, M, M]
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max).detach()
    e = torch.exp(masked - row_max)                                    # 0 at masked keys
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    probs = e / denom.masked_fill(empty, 1.0)
    out = torch.matmul(probs, vh.unsqueeze(1))                         # [B, S, H, M, Dh]
    query_in = member[:, :, None, :, None]                             # [B, S, 1, M, 1]
    out = out.masked_fill(~query_in, 0.0)
    out = out.transpose(2, 3).reshape(B, member.shape[1], M, E)
    lse = torch.where(empty, 0.0, row_max + torch.log(denom.masked_fill(empty, 1.0))).squeeze(-1)
    return drop_subset_axis(out, mask).to(q.dtype), drop_subset_axis(lse, mask)
