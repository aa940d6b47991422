"""``subset_sum_pool``: masked sum of modality features, per subset."""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast.backend import select_kernel
from mmfast.ops import _validate as V
from mmfast.ops import reference as ref
from mmfast.ops._custom import eager_fast_path, fresh, reference_vjp

_KERNEL = "subset_pool"


def _forward_impl(x: Tensor, mask: Tensor) -> Tensor:
    kernel = select_kernel("subset_sum_pool", _KERNEL, x.device)
    if kernel is not None:
        return kernel.subset_sum_pool_forward(x, mask)
    return fresh(ref.subset_sum_pool(x, mask).contiguous(), x)


_forward = torch.library.custom_op("mmfast::subset_sum_pool", mutates_args=())(_forward_impl)


@_forward.register_fake
def _(x, mask):
    return x.new_empty((*mask.shape[:-1], x.shape[-1]))


def _backward_impl(grad_out: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    kernel = select_kernel("subset_sum_pool", _KERNEL, x.device)
    if kernel is not None:
        return kernel.subset_sum_pool_backward(grad_out, x, mask)
    return reference_vjp(ref.subset_sum_pool, (x,), (grad_out,), mask)[0]


_backward = torch.library.custom_op("mmfast::subset_sum_pool_backward",
                                    mutates_args=())(_backward_impl)


@_backward.register_fake
def _(grad_out, x, mask):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, mask = inputs
    ctx.save_for_backward(x, mask)


def _autograd(ctx, grad_out):
    x, mask = ctx.saved_tensors
    grad_x = _backward_call(grad_out, x, mask) if ctx.needs_input_grad[0] else None
    return grad_x, None


_forward.register_autograd(_autograd, setup_context=_setup_context)
_forward_call = eager_fast_path(_forward, _forward_impl, _setup_context, _autograd)
_backward_call = eager_fast_path(_backward, _backward_impl)


def subset_sum_pool(x: Tensor, mask: Tensor) -> Tensor:
    """Sum the features of the modalities in each subset.

    Args:
        x: ``[B, M, D]`` features (float16, bfloat16, float32 or float64).
        mask: bool ``[B, M]`` (one subset per row) or ``[B, S, M]`` (S subsets per row; a bank
            shared by all rows may be passed as ``bank.expand(B, S, M)`` without a copy).
    Returns:
        ``[B, D]`` or ``[B, S, D]`` in ``x.dtype``: ``Σ_{m ∈ subset} x[b, m]``, accumulated in
        float32 (float64 for float64). Features of a modality in none of a row's subsets are
        never read.
    """
    op = "subset_sum_pool"
    V.tensor(op, "x", x, ndim=3, expected="[B, M, D]")
    V.mask(op, "mask", mask, x.shape[0], x.shape[1])
    V.same_device(op, x=x, mask=mask)
    return _forward_call(x, mask)
