"""Importance-weighted log-mean-exp over K samples, forward and backward.

For each column n of ``w [K, N]`` (the batch axes flattened):

    out[n] = logsumexp_k w[k, n] − log K,        ∂w[k, n] = g[n] · exp(w[k, n] − lse[n])

where ``lse = out + log K``. The forward sweeps K in chunks with an online log-sum-exp (a running
maximum and a sum rescaled whenever the maximum grows); the backward recomputes lse the same
way, then writes the softmax over K times the upstream gradient. A column of only −inf gives
−inf and a zero gradient. Accumulation in float32 (float64 for float64 inputs); w is read by
strides; one program owns a block of columns and all of K (deterministic).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfast.kernels._common import (acc_dtype, cdiv, element_budget, next_power_of_2, num_warps,
                                    split_float, torch_acc_dtype)
from mmfast.kernels._launch import fast_launch


@triton.jit
def _column_lse(w_ptr, offs_n, valid_n, K, stride_k, stride_n, ACC: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_N]`` log-sum-exp over k of the given columns (−inf for an all −inf column)."""
    top = tl.full((BLOCK_N,), float("-inf"), ACC)
    total = tl.zeros((BLOCK_N,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        valid = (offs_k < K)[:, None] & valid_n[None, :]
        w = tl.load(w_ptr + offs_k[:, None] * stride_k + offs_n[None, :] * stride_n, mask=valid,
                    other=float("-inf")).to(ACC)
        new_top = tl.maximum(top, tl.max(w, axis=0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(w - shift[None, :]), axis=0)
        top = new_top
    # All −inf: top is −inf and total 0; log(1) keeps the result −inf without a log(0).
    return top + tl.log(tl.where(total > 0, total, 1.0))


@fast_launch
@triton.jit
def _forward_kernel(w_ptr, out_ptr, K, N, log_k_hi, log_k_lo, stride_k, stride_n,
                    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < N
    lse = _column_lse(w_ptr, offs_n, valid_n, K, stride_k, stride_n, ACC, BLOCK_K, BLOCK_N)
    # log K from float32 halves: exact in float64 too.
    out = lse - (tl.cast(log_k_hi, ACC) + tl.cast(log_k_lo, ACC))
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=valid_n)


@fast_launch
@triton.jit
def _backward_kernel(g_ptr, w_ptr, dw_ptr, K, N, stride_g, stride_k, stride_n,
                     ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < N
    lse = _column_lse(w_ptr, offs_n, valid_n, K, stride_k, stride_n, ACC, BLOCK_K, BLOCK_N)
    g = tl.load(g_ptr + offs_n * stride_g, mask=valid_n, other=0.0).to(ACC)
    # A zero-weight column (lse = −inf) has no softmax: give it a zero gradient, not NaN.
    finite = lse != float("-inf")
    shift = tl.where(finite, lse, 0.0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        valid = (offs_k < K)[:, None] & valid_n[None, :]
        w = tl.load(w_ptr + offs_k[:, None] * stride_k + offs_n[None, :] * stride_n, mask=valid,
                    other=float("-inf")).to(ACC)
        dw = tl.where(finite[None, :], g[None, :] * tl.exp(w - shift[None, :]), 0.0)
        # The gradient is contiguous [K, N].
        tl.store(dw_ptr + offs_k[:, None] * N + offs_n[None, :], dw.to(dw_ptr.dtype.element_ty),
                 mask=valid)


def _blocks(K: int, N: int) -> tuple[int, int]:
    budget = element_budget()
    block_n = min(next_power_of_2(max(N, 1)), 256)
    block_k = min(next_power_of_2(K), max(1, budget // block_n))
    return block_k, block_n


def importance_logsumexp_forward(w: torch.Tensor) -> torch.Tensor:
    """Implementation of ``mmfast::importance_logsumexp``: w ``[K, *batch]`` (any strides) ->
    ``[*batch]`` (float32, float64 for float64 w)."""
    K = w.shape[0]
    out = torch.empty(w.shape[1:], dtype=torch_acc_dtype(w.dtype), device=w.device)
    if out.numel() == 0:
        return out
    flat = w.reshape(K, -1)
    N = flat.shape[1]
    block_k, block_n = _blocks(K, N)
    hi, lo = split_float(math.log(K))
    _forward_kernel[(cdiv(N, block_n),)](
        flat, out, K, N, hi, lo, *flat.stride(), ACC=acc_dtype(w.dtype),
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps(block_k * block_n))
    return out


def importance_logsumexp_backward(grad: torch.Tensor | None,
                                  w: torch.Tensor) -> tuple[torch.Tensor]:
    """Implementation of ``mmfast::importance_logsumexp_backward``: grad ``[*batch]`` ->
    ``(dw,)`` with dw ``[K, *batch]`` contiguous in w's dtype."""
    K = w.shape[0]
    dw = torch.empty_like(w, memory_format=torch.contiguous_format)
    if grad is None or dw.numel() == 0:
        return (dw.zero_(),)
    flat = w.reshape(K, -1)
    N = flat.shape[1]
    g = grad.reshape(-1)
    block_k, block_n = _blocks(K, N)
    _backward_kernel[(cdiv(N, block_n),)](
        g, flat, dw, K, N, g.stride(0), *flat.stride(), ACC=acc_dtype(w.dtype),
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps(block_k * block_n))
    return (dw,)
