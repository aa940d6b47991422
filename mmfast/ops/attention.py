"""``subset_attention``: multi-head self-attention restricted to each subset's tokens."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mmfast.backend import select_kernel
from mmfast.ops import _validate as V
from mmfast.ops import reference as ref
from mmfast.ops._custom import eager_fast_path, fresh, reference_vjp

_KERNEL = "subset_attention"


def _lse_shape(q: Tensor, mask: Tensor, num_heads: int) -> tuple[int, ...]:
    return (*mask.shape[:-1], num_heads, q.shape[1])


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, num_heads: int,
                  scale: float) -> tuple[Tensor, Tensor]:
    kernel = select_kernel("subset_attention", _KERNEL, q.device)
    if kernel is not None:
        return kernel.subset_attention_forward(q, k, v, mask, num_heads, scale)
    out, lse = ref.subset_attention(q, k, v, mask, num_heads, scale)
    return fresh(out.contiguous(), q, k, v), fresh(lse.contiguous())


_forward = torch.library.custom_op("mmfast::subset_attention", mutates_args=())(_forward_impl)


@_forward.register_fake
def _(q, k, v, mask, num_heads, scale):
    out = q.new_empty((*mask.shape[:-1], q.shape[1], q.shape[2]))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, q.new_empty(_lse_shape(q, mask, num_heads), dtype=acc)


def _backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor,
                   lse: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    kernel = select_kernel("subset_attention", _KERNEL, q.device)
    if kernel is not None:
        return kernel.subset_attention_backward(grad_out, q, k, v, mask, out, lse, num_heads, scale)
    grads = reference_vjp(lambda *a: ref.subset_attention(*a)[0], (q, k, v), (grad_out,),
                          mask, num_heads, scale)
    return tuple(grads)


_backward = torch.library.custom_op("mmfast::subset_attention_backward",
                                    mutates_args=())(_backward_impl)


@_backward.register_fake
def _(grad_out, q, k, v, mask, out, lse, num_heads, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _autograd(ctx, grad_out, grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_call(grad_out, q, k, v, mask, out, lse, ctx.num_heads, ctx.scale)
    return dq, dk, dv, None, None, None


_forward.register_autograd(_autograd, setup_context=_setup_context)
_forward_call = eager_fast_path(_forward, _forward_impl, _setup_context, _autograd)
_backward_call = eager_fast_path(_backward, _backward_impl)


def subset_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, num_heads: int,
                     scale: float | None = None) -> Tensor:
    """Multi-head self-attention over modality tokens, one softmax per subset.

    For each subset, token i in the subset attends to the keys of the tokens in the subset
    (softmax over them, per head); rows of tokens outside the subset are 0, and a subset with
    no tokens gives zeros, never NaN. The scores of a sample are shared by all its subsets.
    On the triton backend, float32 inputs are multiplied in full float32 precision unless
    TF32 is allowed for float32 matmuls (``torch.set_float32_matmul_precision("high")``).

    Args:
        q, k, v: ``[B, M, E]``, one dtype, E divisible by ``num_heads``.
        mask: bool ``[B, M]`` or ``[B, S, M]`` (stride-0 banks allowed).
        num_heads: number of heads H; head dim E / H.
        scale: score scale, default ``1 / sqrt(E / H)``.
    Returns:
        ``[B, M, E]`` or ``[B, S, M, E]`` in ``q.dtype``.
    """
    op = "subset_attention"
    V.tensor(op, "q", q, ndim=3, expected="[B, M, E]")
    for name, t in (("k", k), ("v", v)):
        V.tensor(op, name, t, ndim=3, expected=f"{list(q.shape)} like q")
        V.same_shape(op, name, t, q.shape)
    V.same_dtype(op, q=q, k=k, v=v)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    if q.shape[2] % num_heads:
        raise ValueError(f"{op}: q has shape {list(q.shape)}; its last size E={q.shape[2]} must "
                         f"be divisible by num_heads={num_heads}")
    V.mask(op, "mask", mask, q.shape[0], q.shape[1])
    V.same_device(op, q=q, k=k, v=v, mask=mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[2] // num_heads)
    return _forward_call(q, k, v, mask, num_heads, float(scale))[0]
