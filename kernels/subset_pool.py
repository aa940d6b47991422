"""Masked subset sum-pooling: ``out[b, s] = Σ_{m ∈ S_bs} x[b, m]`` and its transpose.

Forward: one program per (row b, part of the row's subsets, block of features). It finds the
modalities its subsets hold from ``[CHUNK_S, M]`` mask tiles, loads those rows of x once as an
``[M, BLOCK_D]`` tile (rows of a modality in none of its subsets are not loaded at all), and
sweeps its subsets in chunks, selecting each subset's members from the tile. The parts of a row
(more than one only on the GPU, when rows alone would leave SMs idle) are adjacent program ids,
so they share the x tile through L2.

Backward: ``grad_x[b, m] = Σ_s mask[b, s, m] grad_out[b, s]``, one program per (row b, block
of modalities, block of features) reducing over the subsets in a fixed order, so it is
deterministic without atomics.

Masks ``[B, M]`` are treated as ``[B, 1, M]``; every tensor is read by strides, so a bank shared
by all rows (``bank.expand(B, S, M)``, stride 0 on B) is never materialised. Accumulation is in
float32 (float64 for float64 inputs); outputs are contiguous, in the input dtype.

Layout (ROW_BITS: one block of at most 16 modalities). Both kernels work on
``[CHUNK_S, BLOCK_M, BLOCK_D]`` selections laid out, through the shape of their big load (the x
tile, the upstream gradient), with 4 adjacent features and every modality in each thread's
registers and lanes and warps along the features: each thread reads a subset's membership
once as a bit set (:func:`mmfast.kernels._masks.subset_bits`, one 32-bit word per four
modalities where the rows are aligned), sums over modalities and subsets in its registers, and
loads or stores its features as one vector. At the 255-subset bank, M = 8, D = 512, float32
(sm_90 PTX, Triton 3.6), the loops take 24.6 instructions per output element in the forward
and 27.8 per upstream-gradient element in the backward, with no shared memory: the layout
Triton chose by default for the earlier ``[BLOCK_M, BLOCK_D]`` tiles (one or two features a
thread) took 28.8 and 32.2, and moved the forward's sums through shared memory between two
barriers before every store. More modalities keep the default layout and read membership
tiles through :func:`mmfast.kernels._masks.load_members`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.backend import triton_interpreting
from mmfast.kernels._common import acc_dtype, cdiv, lane_rows, next_power_of_2
from mmfast.kernels._launch import fast_launch
from mmfast.kernels._masks import (USED_BYTES, chunk_members, mask_layout, mask_row,
                                   members_used)


@fast_launch
@triton.jit
def _pool_forward_kernel(
    x_ptr, mask_ptr, bias_ptr, out_ptr,
    S, M, D, splits, subsets_per_program,
    stride_xb, stride_xm, stride_xd,
    stride_kb, stride_ks, stride_km,
    stride_ob, stride_os,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr, MASK_ROW: tl.constexpr,
    ROW_BITS: tl.constexpr, X_ROWS: tl.constexpr,
):
    # Axis 0 is (row, part of the row's subsets) with the part fastest: the programs that share
    # a row's x tile run next to each other, so it is read from DRAM once and from L2 after.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // splits
    first = (pid % splits) * subsets_per_program
    last = tl.minimum(first + subsets_per_program, S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    chunk = tl.arange(0, CHUNK_S)
    valid_d = offs_d < D

    # Only the x rows of modalities some subset of this program holds are read.
    needed = members_used(mask_ptr, row, first, last, offs_m, M, stride_kb, stride_ks, stride_km,
                          MASK_ROW, BLOCK_M, max(CHUNK_S, USED_BYTES // BLOCK_M))
    x_rows = (x_ptr + row * stride_xb + offs_m.to(tl.int64)[:, None] * stride_xm
              + offs_d.to(tl.int64)[None, :] * stride_xd)
    keep_x = needed[:, None] & valid_d[None, :]
    if ROW_BITS:
        # Loaded as [X_ROWS, BLOCK_M, BLOCK_D], the shape of the per-chunk selection: Triton
        # lays the selection out as it coalesces this load, with a few adjacent features and
        # every modality in each thread's registers, and lanes and warps along the features
        # (then the subsets). A thread then decodes a subset's
        # membership once for its features, sums over modalities in registers and stores its
        # features as one vector. With the tile loaded as [BLOCK_M, BLOCK_D], the selection got
        # a default layout of one feature a thread (sm_90 PTX, Triton 3.6, M = 8, D = 512: 8
        # membership bytes decoded per 2 features, and the sums moved through shared memory,
        # between two barriers, before every store; 29 instructions per output element
        # against 25 now).
        # X_ROWS = CHUNK_S (the same addresses for every chunk row) when the features alone
        # cannot occupy every lane and warp: the rest then go along the subsets rather than
        # the modalities (a sum over lanes); otherwise 1, and the tile is held once.
        x = tl.load(x_rows[None, :, :] + 0 * tl.arange(0, X_ROWS)[:, None, None],
                    mask=keep_x[None, :, :], other=0.0).to(ACC_DTYPE)
    else:
        x = tl.load(x_rows, mask=keep_x, other=0.0).to(ACC_DTYPE)[None, :, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=valid_d, other=0.0).to(ACC_DTYPE)

    for s0 in range(first, last, CHUNK_S):
        offs_s = s0 + chunk
        valid_s = offs_s < last
        member = chunk_members(mask_ptr, row, offs_s, last, offs_m, M, stride_kb, stride_ks,
                                stride_km, MASK_ROW, BLOCK_M, ROW_BITS)
        # Select, never multiply by the mask: inf/NaN a row holds for another subset stays out.
        acc = tl.sum(tl.where(member, x, 0.0), axis=1)   # [CS, BD]
        if HAS_BIAS:
            acc += bias[None, :]
        out = (out_ptr + row * stride_ob + offs_s.to(tl.int64)[:, None] * stride_os
               + offs_d[None, :])
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid_s[:, None] & valid_d[None, :])


@fast_launch
@triton.jit
def _pool_backward_kernel(
    grad_ptr, mask_ptr, out_ptr,
    S, M, D,
    stride_gb, stride_gs, stride_gd,
    stride_kb, stride_ks, stride_km,
    stride_ob, stride_om,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr, MASK_ROW: tl.constexpr,
    ROW_BITS: tl.constexpr, ACC_ROWS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_m = offs_m < M
    valid_d = offs_d < D
    chunk = tl.arange(0, CHUNK_S)

    # ACC_ROWS = CHUNK_S when lanes or warps run along the chunk's subsets (few features): each
    # keeps its own partial sums, added across lanes once after the loop instead of in every
    # iteration; else 1 (the chunk's subsets are in each thread's registers).
    acc = tl.zeros((ACC_ROWS, BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    # A chunk of subsets at a time, always in the same order: the sum is deterministic.
    for s0 in range(0, S, CHUNK_S):
        offs_s = s0 + chunk
        member = chunk_members(mask_ptr, row, offs_s, S, offs_m, M, stride_kb, stride_ks,
                                stride_km, MASK_ROW, BLOCK_M, ROW_BITS)       # [CS, BM, 1]
        grads = (grad_ptr + row * stride_gb + offs_s.to(tl.int64)[:, None] * stride_gs
                 + offs_d.to(tl.int64)[None, :] * stride_gd)
        keep = (offs_s < S)[:, None] & valid_d[None, :]
        if ROW_BITS:
            # Read as [CHUNK_S, 1, BLOCK_D], the shape it is selected in: each thread holds a
            # few adjacent features of its subsets, and the sums over the chunk and over the
            # modalities stay in its registers (as the forward's x tile).
            grad = tl.load(grads[:, None, :], mask=keep[:, None, :], other=0.0).to(ACC_DTYPE)
        else:
            grad = tl.load(grads, mask=keep, other=0.0).to(ACC_DTYPE)[:, None, :]
        chosen = tl.where(member, grad, 0.0)                             # [CS, BM, BD]
        if ACC_ROWS == 1:
            acc += tl.sum(chosen, axis=0, keep_dims=True)
        else:
            acc += chosen
    acc = tl.sum(acc, axis=0)

    out = out_ptr + row * stride_ob + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid_m[:, None] & valid_d[None, :])


# The forward splits a row's subsets over programs until there are about this many (on the GPU).
PROGRAMS = 4096


def _tile_budget() -> int:
    """Elements one program may hold: a register budget on the GPU; in the interpreter, where
    every program costs milliseconds, big tiles mean few programs."""
    return 1 << 16 if triton_interpreting() else 4096


def _row_bits(M: int, block_m: int) -> bool:
    """ROW_BITS: the kernels read each subset's membership as a bit set and lay their tiles
    out with every modality in each thread's registers (one block of at most 16 modalities)."""
    return M <= block_m <= 16


def _gpu_blocks(S: int, block_m: int, D: int, itemsize: int) -> tuple[int, int, int]:
    """BLOCK_D, CHUNK_S, num_warps on the GPU for ROW_BITS tiles ``[CHUNK_S, BLOCK_M,
    BLOCK_D]``: one 16-byte vector of adjacent features a thread (4 in float32, 8 in 16-bit
    types), lanes and up to 4 warps along the features, up to 64 tile elements a thread. Warps
    the features cannot fill would go along the subsets, and the sums over modalities of 16-bit
    inputs then went through shared memory in every iteration (sm_90, Triton 3.9)."""
    block_d = min(next_power_of_2(D), 512)
    warps = max(1, min(4, block_d * itemsize // 512))
    chunk_s = min(next_power_of_2(max(S, 1)), max(1, 2048 * warps // (block_m * block_d)))
    return block_d, chunk_s, warps


def _forward_blocks(S: int, M: int, D: int, itemsize: int = 4) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_D, CHUNK_S, num_warps: the x tile ``[BLOCK_M, BLOCK_D]`` a program
    holds, and the ``[CHUNK_S, BLOCK_M, BLOCK_D]`` selection of a chunk within the budget."""
    budget = _tile_budget()
    block_m = next_power_of_2(max(M, 1))
    if _row_bits(M, block_m) and not triton_interpreting():
        return (block_m, *_gpu_blocks(S, block_m, D, itemsize))
    block_d = min(next_power_of_2(D), 4096 if triton_interpreting() else 256,
                  max(16, budget // block_m))
    chunk_s = min(next_power_of_2(max(S, 1)), max(1, budget // (block_m * block_d)))
    warps = 8 if block_m * block_d >= 4096 else 4
    return block_m, block_d, chunk_s, warps


def _backward_blocks(S: int, M: int, D: int, itemsize: int = 4) -> tuple[int, int, int, int]:
    budget = _tile_budget()
    block_m = min(next_power_of_2(M), 64)
    if _row_bits(M, block_m) and not triton_interpreting():
        return (block_m, *_gpu_blocks(S, block_m, D, itemsize))
    block_d = min(next_power_of_2(D), 4096 if triton_interpreting() else 512,
                  max(16, budget // block_m))
    # The [CHUNK_S, BLOCK_M, BLOCK_D] product of a chunk stays within twice the tile budget.
    chunk_s = min(next_power_of_2(S), max(1, 2 * budget // (block_m * block_d)), 64)
    warps = 8 if block_m * block_d >= 4096 else 4
    return block_m, block_d, chunk_s, warps


def launch_pool(x: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_{m ∈ S} x[b, m] (+ bias)`` for every subset.

    Args:
        x: ``[B, M, D]``, any strides.
        mask: bool ``[B, M]`` or ``[B, S, M]``, any strides (stride 0 for a shared bank).
        bias: ``[D]`` added to every output row, or None.
    Returns:
        contiguous ``[B, D]`` or ``[B, S, D]`` in ``x.dtype``.
    """
    B, M, D = x.shape
    mask_bytes, S, (skb, sks, skm) = mask_layout(mask)
    out = torch.empty((*mask.shape[:-1], D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_m, block_d, chunk_s, warps = _forward_blocks(S, M, D, x.element_size())
    row_bits = _row_bits(M, block_m)
    d_blocks = cdiv(D, block_d)
    chunks = cdiv(S, chunk_s)
    # On the GPU, split a row's subsets over programs when rows alone would leave SMs idle.
    splits = 1 if triton_interpreting() else max(1, min(chunks, cdiv(PROGRAMS, B * d_blocks)))
    per_program = cdiv(chunks, splits) * chunk_s
    splits = cdiv(S, per_program)
    has_bias = bias is not None
    _pool_forward_kernel[(B * splits, d_blocks)](
        x, mask_bytes, bias.contiguous() if has_bias else x, out,
        S, M, D, splits, per_program,
        x.stride(0), x.stride(1), x.stride(2),
        skb, sks, skm,
        out.stride(0), D if mask.dim() == 3 else 0,
        HAS_BIAS=has_bias, ACC_DTYPE=acc_dtype(x.dtype),
        BLOCK_M=block_m, BLOCK_D=block_d, CHUNK_S=chunk_s,
        MASK_ROW=mask_row(mask_bytes, M, block_m, (skb, sks, skm)),
        ROW_BITS=row_bits,
        X_ROWS=lane_rows(block_d, chunk_s, warps, x.element_size()) if row_bits else 1,
        num_warps=warps,
    )
    return out


def launch_pool_transpose(grad_out: torch.Tensor, mask: torch.Tensor, num_modalities: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """``Σ_s mask[b, s, m] grad_out[b, s]`` for every modality: the adjoint of pooling.

    Args:
        grad_out: ``[B, D]`` or ``[B, S, D]`` (the mask's leading shape), any strides.
        mask: bool ``[B, M]`` or ``[B, S, M]``, any strides.
        num_modalities: M.
        dtype: dtype of the result.
    Returns:
        contiguous ``[B, M, D]``; rows of modalities in none of a row's subsets are 0.
    """
    B, M, D = mask.shape[0], num_modalities, grad_out.shape[-1]
    mask_bytes, S, (skb, sks, skm) = mask_layout(mask)
    out = torch.empty((B, M, D), dtype=dtype, device=grad_out.device)
    if out.numel() == 0:
        return out
    if S == 0:
        return out.zero_()
    if mask.dim() == 2:
        sgb, sgs, sgd = grad_out.stride(0), 0, grad_out.stride(1)
    else:
        sgb, sgs, sgd = grad_out.stride()
    block_m, block_d, chunk_s, warps = _backward_blocks(S, M, D, grad_out.element_size())
    row_bits = _row_bits(M, block_m)
    grid = (B, cdiv(M, block_m), cdiv(D, block_d))
    _pool_backward_kernel[grid](
        grad_out, mask_bytes, out,
        S, M, D,
        sgb, sgs, sgd,
        skb, sks, skm,
        out.stride(0), out.stride(1),
        ACC_DTYPE=acc_dtype(dtype),
        BLOCK_M=block_m, BLOCK_D=block_d, CHUNK_S=chunk_s,
        MASK_ROW=mask_row(mask_bytes, M, block_m, (skb, sks, skm)),
        ROW_BITS=row_bits,
        ACC_ROWS=lane_rows(block_d, chunk_s, warps, grad_out.element_size()) if row_bits else 1,
        num_warps=warps,
    )
    return out


def subset_sum_pool_forward(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Implementation of ``mmfast::subset_sum_pool``: x ``[B, M, D]``, mask ``[B, (S,) M]`` ->
    ``[B, (S,) D]`` in x.dtype."""
    return launch_pool(x, mask)


def subset_sum_pool_backward(grad_out: torch.Tensor, x: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """Implementation of ``mmfast::subset_sum_pool_backward``: grad_out ``[B, (S,) D]`` ->
    grad_x ``[B, M, D]`` in x.dtype."""
    return launch_pool_transpose(grad_out, mask, x.shape[1], x.dtype)
