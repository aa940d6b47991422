"""``gaussian_log_prob`` and ``mixture_log_prob``: log-densities of latent samples."""
from __future__ import annotations

import torch
from torch import Tensor

from mmfast.ops import _validate as V
from mmfast.ops import reference as ref
from mmfast.ops._custom import define_op
from mmfast.ops.reference._common import acc_dtype


def _batch_shape(z: Tensor, mu: Tensor) -> tuple[int, ...]:
    return (z.shape[0], *torch.broadcast_shapes(z.shape[1:-1], mu.shape[:-1]))


_gaussian = define_op(
    "gaussian_log_prob", args="Tensor z, Tensor mu, Tensor logvar", differentiable=(0, 1, 2),
    reference=ref.gaussian_log_prob, kernel_module="densities",
    fake_out=lambda z, mu, logvar: z.new_empty(_batch_shape(z, mu), dtype=acc_dtype(z.dtype)))

_mixture = define_op(
    "mixture_log_prob", args="Tensor z, Tensor logits, Tensor mu, Tensor logvar",
    differentiable=(0, 1, 2, 3), reference=ref.mixture_log_prob, kernel_module="densities",
    fake_out=lambda z, logits, mu, logvar: z.new_empty(z.shape[:-1], dtype=acc_dtype(z.dtype)))


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Diagonal Gaussian log-density summed over the latent axis.

    Args:
        z: ``[K, *batch, d]`` samples.
        mu, logvar: ``[*batch, d]`` (or shapes that broadcast against ``z[k]``).
    Returns:
        ``[K, *batch]``, float32 (float64 for float64 inputs).
    """
    op = "gaussian_log_prob"
    V.tensor(op, "z", z, min_ndim=2, expected="[K, *batch, d]")
    V.tensor(op, "mu", mu, min_ndim=1, expected=f"[*batch, {z.shape[-1]}]")
    V.tensor(op, "logvar", logvar, min_ndim=1, expected=f"{list(mu.shape)} like mu")
    V.same_shape(op, "logvar", logvar, mu.shape)
    V.same_dtype(op, z=z, mu=mu, logvar=logvar)
    V.same_device(op, z=z, mu=mu, logvar=logvar)
    if mu.shape[-1] != z.shape[-1]:
        raise ValueError(f"{op}: mu has shape {list(mu.shape)}; expected last size d={z.shape[-1]} "
                         f"as in z {list(z.shape)}")
    try:
        batch = torch.broadcast_shapes(z.shape[1:], mu.shape)
    except RuntimeError:
        raise ValueError(f"{op}: mu has shape {list(mu.shape)}; expected [*batch, d] broadcastable "
                         f"against z[k] of shape {list(z.shape[1:])}") from None
    # Broadcast operands reach the op unexpanded: z only gains size-1 axes after K so that its
    # batch axes line up with mu's. The kernel reads them by strides and sums the gradient of a
    # shared operand itself (over k in registers, over broadcast rows per block), instead of
    # returning a [K, *batch, d] gradient for autograd of expand to reduce.
    aligned = z.reshape(z.shape[0], *(1,) * (len(batch) + 1 - z.dim()), *z.shape[1:])
    return _gaussian(aligned, mu, logvar)


def mixture_log_prob(z: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Log-density of a diagonal Gaussian mixture: ``log Σ_c π_c N(z; mu_c, exp(logvar_c))``.

    Args:
        z: ``[K, *batch, d]``; logits: ``[C]`` unnormalised mixture weights;
        mu, logvar: ``[C, d]``.
    Returns:
        ``[K, *batch]``, float32 (float64 for float64 inputs).
    """
    op = "mixture_log_prob"
    V.tensor(op, "z", z, min_ndim=2, expected="[K, *batch, d]")
    V.tensor(op, "logits", logits, ndim=1, expected="[C]")
    C, d = logits.shape[0], z.shape[-1]
    V.tensor(op, "mu", mu, ndim=2, expected=f"[{C}, {d}]")
    V.tensor(op, "logvar", logvar, ndim=2, expected=f"[{C}, {d}]")
    V.same_shape(op, "mu", mu, (C, d))
    V.same_shape(op, "logvar", logvar, (C, d))
    V.same_dtype(op, z=z, logits=logits, mu=mu, logvar=logvar)
    V.same_device(op, z=z, logits=logits, mu=mu, logvar=logvar)
    return _mixture(z, logits, mu, logvar)
