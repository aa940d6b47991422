"""@triton.jit helpers shared by the Gaussian kernels (gaussian_terms.py, densities.py).

Nothing here launches anything: tile loads, the ``n · log 2π`` constant exact in float64, the
mixture weights from their logits, and a row-wise log-sum-exp.
"""
from __future__ import annotations

import triton
import triton.language as tl

from mmfast.kernels._common import LOG_2PI_HI, LOG_2PI_LO

_LOG_2PI_HI = tl.constexpr(LOG_2PI_HI)
_LOG_2PI_LO = tl.constexpr(LOG_2PI_LO)


@triton.jit
def _log_2pi_times(n, ACC: tl.constexpr):
    """``n · log(2π)`` in ACC, exact in float64 (float32 halves of the constant)."""
    return n * (tl.full((), _LOG_2PI_HI, ACC) + _LOG_2PI_LO)


@triton.jit
def _load_tile(ptr, offs_r, offs_d, valid, stride_r, stride_d, ACC: tl.constexpr):
    """``[R, D]`` tile at ``ptr + r·stride_r + j·stride_d`` in ACC (0 where not ``valid``)."""
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, mask=valid,
                   other=0.0).to(ACC)


@triton.jit
def _mixture_weights(pl_ptr, C, stride_pl, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mixture logits ``[C]`` -> (log π ``[BLOCK_C]`` (−inf past C), π (0 past C)), by a
    max-shifted log-softmax."""
    offs_c = tl.arange(0, BLOCK_C)
    valid_c = offs_c < C
    logits = tl.load(pl_ptr + offs_c * stride_pl, mask=valid_c, other=float("-inf")).to(ACC)
    top = tl.max(logits, axis=0)
    log_w = logits - top - tl.log(tl.sum(tl.exp(logits - top), axis=0))
    log_w = tl.where(valid_c, log_w, float("-inf"))
    return log_w, tl.where(valid_c, tl.exp(log_w), 0.0)


@triton.jit
def _logsumexp_rows(comp):
    """``[R, C]`` -> ``[R]``: log Σ_c exp(comp), shifted by the row maximum (by 0 in a row of
    −inf only, which then gives −inf, not −inf − (−inf) = NaN: a sample so far out that every
    component's square overflowed)."""
    top = tl.max(comp, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.sum(tl.exp(comp - top[:, None]), axis=1))
