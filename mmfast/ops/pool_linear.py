"""``subset_pool_linear``: the first linear layer of ρ applied to every subset's pooled features.

On the triton backend the order of the two linear maps is chosen by cost (METHOD.md, cost
note): for a bank of many subsets (S > M roughly) the M rows are transformed once,
``y = g Wᵀ`` (``[B, M, D] -> [B, M, out]``, one matmul), and the subset sums are pooled from y
with the subset_sum_pool kernel, which adds the bias in the same pass; for few subsets the
features are pooled first and the S pooled rows are transformed. The reference backend
computes the direct form (:func:`mmfast.ops.reference.subset_pool_linear`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast.backend import select_kernel
from mmfast.ops import _validate as V
from mmfast.ops import reference as ref
from mmfast.ops._custom import absent, eager_fast_path, fresh, reference_vjp
from mmfast.ops.reference._common import acc_dtype, in_any_subset

# The pooling kernel serves this op: the linear map itself is a plain matmul (cuBLAS).
_KERNEL = "subset_pool"
_POOL_OP = "subset_sum_pool"


def transform_first(num_subsets: int, num_modalities: int, features: int,
                    out_features: int) -> bool:
    """Whether transforming the M rows and pooling afterwards costs fewer multiply-adds than
    pooling the S subsets and transforming each (per batch row):
    ``M·D·out + S·M·out`` against ``S·M·D + S·D·out``."""
    S, M, D, O = num_subsets, num_modalities, features, out_features
    return M * D * O + S * M * O < S * M * D + S * D * O


def _subsets(mask: Tensor) -> int:
    return 1 if mask.dim() == 2 else mask.shape[1]


def _members_only(g: Tensor, mask: Tensor) -> Tensor:
    """g with the rows of modalities in none of a row's subsets set to 0, so NaN there (a missing
    modality) cannot reach a matmul that also touches the rows that matter."""
    return torch.where(in_any_subset(mask).unsqueeze(-1), g, 0.0)


def _forward_impl(g: Tensor, mask: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    kernel = select_kernel(_POOL_OP, _KERNEL, g.device)
    if kernel is None:
        return fresh(ref.subset_pool_linear(g, mask, weight, bias).contiguous(), g, weight, bias)
    B, M, D = g.shape
    if transform_first(_subsets(mask), M, D, weight.shape[0]):
        # Rows outside every subset may hold NaN: their y rows are computed but never loaded.
        rows = torch.matmul(g, weight.t())                                    # [B, M, out]
        return kernel.launch_pool(rows, mask, bias)
    pooled = kernel.launch_pool(g, mask, None)                                # [B, (S,) D]
    return torch.nn.functional.linear(pooled, weight, bias).contiguous()


_forward = torch.library.custom_op("mmfast::subset_pool_linear", mutates_args=())(_forward_impl)


@_forward.register_fake
def _(g, mask, weight, bias):
    return g.new_empty((*mask.shape[:-1], weight.shape[0]))


def _backward_impl(grad_out: Tensor, g: Tensor, mask: Tensor, weight: Tensor,
                   bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for (g, weight, bias); an absent bias's is empty."""
    kernel = select_kernel(_POOL_OP, _KERNEL, g.device)
    if kernel is None:
        grads = reference_vjp(lambda g_, w_, b_: ref.subset_pool_linear(g_, mask, w_, b_),
                              (g, weight, bias), (grad_out,))
        return tuple(absent(g) if t is None else t for t in grads)
    B, M, D = g.shape
    out_features = weight.shape[0]
    grad_out = grad_out.contiguous()
    grad_bias = absent(g) if bias is None else (
        grad_out.reshape(-1, out_features).sum(0, dtype=acc_dtype(bias.dtype)).to(bias.dtype))
    if transform_first(_subsets(mask), M, D, out_features):
        # out = pool(g Wᵀ): grad of the rows y is the transpose of pooling (zero outside every
        # subset), then the two matmul gradients.
        grad_rows = kernel.launch_pool_transpose(grad_out, mask, M, g.dtype)   # [B, M, out]
        grad_g = torch.matmul(grad_rows, weight)                              # [B, M, D]
        g_in = _members_only(g, mask)
        grad_weight = grad_rows.reshape(-1, out_features).t() @ g_in.reshape(-1, D)
    else:
        # out = pool(g) Wᵀ: recompute the pooled rows (one cheap pass) rather than keep them.
        pooled = kernel.launch_pool(g, mask, None)                            # [B, (S,) D]
        grad_pooled = torch.matmul(grad_out, weight)                          # [B, (S,) D]
        grad_g = kernel.launch_pool_transpose(grad_pooled, mask, M, g.dtype)
        grad_weight = grad_out.reshape(-1, out_features).t() @ pooled.reshape(-1, D)
    return grad_g.contiguous(), grad_weight.contiguous(), grad_bias


_backward = torch.library.custom_op("mmfast::subset_pool_linear_backward",
                                    mutates_args=())(_backward_impl)


@_backward.register_fake
def _(grad_out, g, mask, weight, bias):
    return (g.new_empty(g.shape), weight.new_empty(weight.shape),
            absent(g) if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    g, mask, weight, bias = inputs
    ctx.save_for_backward(g, mask, weight, bias)


def _autograd(ctx, grad_out):
    g, mask, weight, bias = ctx.saved_tensors
    grad_g, grad_weight, grad_bias = _backward_call(grad_out, g, mask, weight, bias)
    return grad_g, None, grad_weight, None if bias is None else grad_bias


_forward.register_autograd(_autograd, setup_context=_setup_context)
_forward_call = eager_fast_path(_forward, _forward_impl, _setup_context, _autograd)
_backward_call = eager_fast_path(_backward, _backward_impl)


def subset_pool_linear(g: Tensor, mask: Tensor, weight: Tensor,
                       bias: Optional[Tensor] = None) -> Tensor:
    """``W · Σ_{m∈S} g_m + b`` for every subset S: pooling followed by a linear layer.

    Equal to ``torch.nn.functional.linear(subset_sum_pool(g, mask), weight, bias)``; on the
    triton backend a bank of many subsets is served by transforming the M rows once and pooling
    the transformed rows, so the matmul costs M rows per sample instead of S.

    Args:
        g: ``[B, M, D]`` per-modality features (float16, bfloat16, float32 or float64).
        mask: bool ``[B, M]`` or ``[B, S, M]`` (a shared bank may be ``bank.expand(B, S, M)``).
        weight: ``[out, D]``, the dtype of g.
        bias: ``[out]`` or None.
    Returns:
        ``[B, out]`` or ``[B, S, out]`` in ``g.dtype``. Features of a modality in none of a row's
        subsets are never read (NaN there does not leak into the result or the gradients).
    """
    op = "subset_pool_linear"
    V.tensor(op, "g", g, ndim=3, expected="[B, M, D]")
    V.mask(op, "mask", mask, g.shape[0], g.shape[1])
    V.tensor(op, "weight", weight, ndim=2, expected=f"[out, {g.shape[-1]}]")
    V.same_shape(op, "weight", weight, (weight.shape[0], g.shape[-1]),
                 f"[out, {g.shape[-1]}] (D of g last)")
    if bias is not None:
        V.tensor(op, "bias", bias, ndim=1, expected=f"[{weight.shape[0]}]")
        V.same_shape(op, "bias", bias, (weight.shape[0],))
    V.same_dtype(op, g=g, weight=weight, bias=bias)
    V.same_device(op, g=g, mask=mask, weight=weight, bias=bias)
    return _forward_call(g, mask, weight, bias)
