"""Masked multi-head self-attention over modality subsets, forward and backward.

For row b, head h, subset s and tokens i, j (queries and keys), with head slices q_i, k_j, v_j
of width Dh = E / H:

    score_ij = scale · q_i · k_j                          (once per row and head)
    P^s_ij   = exp(score_ij - lse^s_i)  for i, j ∈ s,  else 0
    lse^s_i  = log Σ_{j ∈ s} exp(score_ij)
    out^s_i  = Σ_j P^s_ij v_j                              (0 for i ∉ s)

Each subset takes its own max-subtracted softmax over its keys, so no subset loses its
probabilities to underflow because another subset's keys score higher; an empty subset gives
zero rows, never NaN.

Saved log-sum-exp (this kernel's own convention, read only by its backward): ``lse^s_i`` as
above for i ∈ s, and 0 for a query i ∉ s (so every row of an empty subset is 0). The library's
reference also fills the rows i ∉ s; nothing reads them.

Backward (FlashAttention's, per subset; dO^s the upstream gradient of out^s, rows i ∉ s unread):

    dP^s = dO^s Vᵀ,   D^s_i = Σ_j P^s_ij dP^s_ij,   dS^s = P^s ∘ (dP^s - D^s)
    dV   = Σ_s P^sᵀ dO^s
    dQ   = scale · (Σ_s dS^s) K,     dK = scale · (Σ_s dS^s)ᵀ Q

``D^s_i = Σ_j P_ij (dO_i · v_j) = dO_i · out_i``, the FlashAttention row term, computed from
P and dP rather than by reading ``out`` back: it saves a pass over the largest tensor, and is
not rounded to a low-precision output dtype. Q and K do not depend on the subset, so the
backward sums dS over the subsets and multiplies by K and Q once per program.

Layout: one program per (row b, head h) loads the ``[BLOCK_Q, BLOCK_D]`` tile of Q and the
``[BLOCK_K, BLOCK_D]`` tiles of K and V once (only tokens in at least one of its subsets: a
missing modality's features are never read, so NaN there cannot leak), computes the
``[BLOCK_Q, BLOCK_K]`` scores once, then sweeps its subsets CHUNK_S at a time: a chunk's
probabilities ``[CHUNK_S, BLOCK_Q, BLOCK_K]`` are flattened to one
``[CHUNK_S·BLOCK_Q, BLOCK_K]`` matrix so that the product with V is a single ``tl.dot``. Keys
and Dh are padded to powers of two of at least 16 (``tl.dot``'s minimum) with masks; queries
only to a power of two with ``CHUNK_S·BLOCK_Q >= 16`` (see :func:`_blocks`). The forward may
split a row's subsets over programs (on the GPU, when rows × heads alone would leave SMs idle);
the backward gives each program every subset of its row and reduces them in a fixed order, so
it is deterministic without atomics.

Precision: q, k, v and the upstream gradient are upcast to float32 (float64 for float64 inputs)
on load; scores, softmax, every product and every accumulation are in that dtype. float32 dots
use ``input_precision="ieee"`` (no TF32 truncation) unless the user allowed TF32 for float32
matmuls (``torch.set_float32_matmul_precision``, see :func:`_precision`). For float16 /
bfloat16 inputs the dots run as TF32, which holds their values exactly (10 mantissa bits);
only the probabilities and dS,
as operands of the per-subset products, are truncated to TF32, much as FlashAttention rounds
them to the input dtype. The final dQ and dK products take the float32 sum of dS in "ieee".

Masks ``[B, M]`` are one subset per row (stride 0 on the subset axis); every input is read by
strides, so a bank shared by all rows (``bank.expand(B, S, M)``) is never materialised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.backend import triton_interpreting
from mmfast.kernels._common import (acc_dtype, cdiv, next_power_of_2, split_float,
                                    torch_acc_dtype)
from mmfast.kernels._launch import fast_launch
from mmfast.kernels._masks import load_members, mask_layout, mask_row, members_used
from mmfast.kernels.subset_attention_small import (SMALL_M, _small_backward_kernel,
                                                   _small_forward_kernel, small_blocks)


@triton.jit
def _chunk_members(mask_ptr, row, offs_s, offs_q, offs_k, S, M, stride_kb, stride_ks,
                   stride_km, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """bool ``[CHUNK_S, BLOCK_Q]`` and ``[CHUNK_S, BLOCK_K]``: the chunk's members as queries
    and as keys. With equal blocks (one subset a chunk, or M >= 16) one load serves both: two
    copies cost the compiler registers (158 instead of about 80 in a per-sample float32
    forward on sm_90, Triton 3.6)."""
    member_q = load_members(mask_ptr, row, offs_s, S, offs_q, M, stride_kb, stride_ks, stride_km,
                            1, BLOCK_Q)
    if BLOCK_Q == BLOCK_K:
        member_k = member_q
    else:
        member_k = load_members(mask_ptr, row, offs_s, S, offs_k, M, stride_kb, stride_ks,
                                stride_km, 1, BLOCK_K)
    return member_q, member_k


@triton.jit
def _load_head(ptr, row, offs_m, cols, used, valid_d, stride_b, stride_m, stride_e,
               ACC_DTYPE: tl.constexpr):
    """``[BLOCK_M, BLOCK_D]`` head slice of q, k or v, upcast to ACC_DTYPE; unused tokens are 0
    and never read."""
    ptrs = (ptr + row * stride_b + offs_m.to(tl.int64)[:, None] * stride_m
            + cols[None, :] * stride_e)
    return tl.load(ptrs, mask=used[:, None] & valid_d[None, :], other=0.0).to(ACC_DTYPE)


@triton.jit
def _matmul_by_columns(a, b, ACC_DTYPE: tl.constexpr):
    """``a [P, R] @ b [R, N]`` as R rank-one updates in a loop that is not unrolled: a float64
    product on the GPU. Triton 3.6 (the lent GPU machines' version) cannot lower a float64
    ``tl.dot`` for sm_90 (ConvertTritonGPUToLLVM), and a broadcast multiply-and-sum makes a
    ``[P, R, N]`` temporary that kept ptxas busy for minutes (tests/_compile_sm90.py). Column
    r of a and row r of b are picked out with a masked sum: O(R·(P + N)) extra work a step,
    affordable on the float64 path, which exists for exactness rather than speed."""
    cols = tl.arange(0, a.shape[1])
    acc = tl.zeros((a.shape[0], b.shape[1]), dtype=ACC_DTYPE)
    for r in range(a.shape[1]):
        a_col = tl.sum(tl.where(cols[None, :] == r, a, 0.0), axis=1)
        b_row = tl.sum(tl.where(cols[:, None] == r, b, 0.0), axis=0)
        acc += a_col[:, None] * b_row[None, :]
    return acc


@triton.jit
def _matmul(a, b, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, FULL: tl.constexpr = False):
    """``a [P, R] @ b [R, N]`` accumulated in ACC_DTYPE: ``tl.dot`` with PRECISION ("ieee" or
    "tf32"; FULL forces "ieee"), or by columns where PRECISION is "columns" (see
    :func:`_precision`). A side under 16 (``tl.dot``'s minimum; the query block of a small M)
    takes a broadcast multiply-and-sum, exact in ACC_DTYPE: these are the once-per-program
    products (scores, dQ, dK), small."""
    if PRECISION == "columns":
        return _matmul_by_columns(a, b, ACC_DTYPE)
    elif a.shape[0] < 16 or a.shape[1] < 16 or b.shape[1] < 16:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif FULL:
        return tl.dot(a, b, input_precision="ieee", out_dtype=ACC_DTYPE)
    else:
        return tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _scale_value(scale_hi, scale_lo, ACC_DTYPE: tl.constexpr):
    # Float kernel arguments travel as float32; float64 inputs get the scale back from its
    # float32 pair (hi + lo, _common.split_float).
    return tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)


@triton.jit
def _load_row_head(q_ptr, k_ptr, v_ptr, mask_ptr, row, first, last, offs_q, offs_k, cols,
                   valid_d, M, scale, stride_qb, stride_qm, stride_qe, stride_kb, stride_km,
                   stride_ke, stride_vb, stride_vm, stride_ve, stride_mb, stride_ms, stride_mm,
                   ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_K: tl.constexpr, CHUNK_S: tl.constexpr):
    """A program's head slices q ``[BLOCK_Q, BLOCK_D]``, k and v ``[BLOCK_K, BLOCK_D]`` (only
    tokens in one of the subsets ``[first, last)``), and the scores ``scale · q kᵀ``
    ``[BLOCK_Q, BLOCK_K]``, computed once and shared by all the subsets."""
    used_q = members_used(mask_ptr, row, first, last, offs_q, M, stride_mb, stride_ms,
                          stride_mm, 1, BLOCK_Q, CHUNK_S)
    # Equal blocks: one set of token flags serves queries and keys (see _chunk_members).
    if BLOCK_Q == BLOCK_K:
        used_k = used_q
    else:
        used_k = members_used(mask_ptr, row, first, last, offs_k, M, stride_mb, stride_ms,
                              stride_mm, 1, BLOCK_K, CHUNK_S)
    q = _load_head(q_ptr, row, offs_q, cols, used_q, valid_d, stride_qb, stride_qm, stride_qe,
                   ACC_DTYPE)
    k = _load_head(k_ptr, row, offs_k, cols, used_k, valid_d, stride_kb, stride_km, stride_ke,
                   ACC_DTYPE)
    v = _load_head(v_ptr, row, offs_k, cols, used_k, valid_d, stride_vb, stride_vm, stride_ve,
                   ACC_DTYPE)
    scores = _matmul(q, tl.trans(k), PRECISION, ACC_DTYPE) * scale
    return q, k, v, scores


@fast_launch
@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    S, M, Dh, subsets_per_program, scale_hi, scale_lo,
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_km, stride_ke,
    stride_vb, stride_vm, stride_ve,
    stride_mb, stride_ms, stride_mm,
    stride_ob, stride_os, stride_om,
    stride_lb, stride_ls, stride_lh,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first = tl.program_id(2) * subsets_per_program
    last = tl.minimum(first + subsets_per_program, S)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    chunk = tl.arange(0, CHUNK_S)
    valid_q = offs_q < M
    valid_d = offs_d < Dh
    cols = (head * Dh + offs_d).to(tl.int64)
    scale = _scale_value(scale_hi, scale_lo, ACC_DTYPE)

    q, k, v, scores = _load_row_head(
        q_ptr, k_ptr, v_ptr, mask_ptr, row, first, last, offs_q, offs_k, cols, valid_d, M,
        scale, stride_qb, stride_qm, stride_qe, stride_kb, stride_km, stride_ke, stride_vb,
        stride_vm, stride_ve, stride_mb, stride_ms, stride_mm, ACC_DTYPE, PRECISION, BLOCK_Q,
        BLOCK_K, CHUNK_S)

    for s0 in range(first, last, CHUNK_S):
        offs_s = s0 + chunk
        member_q, member_k = _chunk_members(mask_ptr, row, offs_s, offs_q, offs_k, last, M,
                                            stride_mb, stride_ms, stride_mm, BLOCK_Q, BLOCK_K)
        masked = tl.where(member_k[:, None, :], scores[None, :, :], float("-inf"))  # [CS,BQ,BK]
        top = tl.max(masked, axis=2)
        # An empty subset has no finite score: shift by 0 so every exp below is exp(-inf) = 0.
        top = tl.where(top == float("-inf"), 0.0, top)
        e = tl.exp(masked - top[:, :, None])
        denom = tl.sum(e, axis=2)                                                # [CS, BQ]
        # A query in the subset has its own key in it, so its denominator is at least 1;
        # queries outside the subset get zero rows.
        inv = tl.where(member_q, 1.0 / tl.where(member_q, denom, 1.0), 0.0)
        probs = e * inv[:, :, None]
        out = _matmul(tl.reshape(probs, (CHUNK_S * BLOCK_Q, BLOCK_K)), v, PRECISION, ACC_DTYPE)
        out = tl.reshape(out, (CHUNK_S, BLOCK_Q, BLOCK_D))

        s64 = offs_s.to(tl.int64)
        keep_s = offs_s < last
        out_ptrs = (out_ptr + row * stride_ob + s64[:, None, None] * stride_os
                    + offs_q.to(tl.int64)[None, :, None] * stride_om + cols[None, None, :])
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty),
                 mask=keep_s[:, None, None] & valid_q[None, :, None] & valid_d[None, None, :])
        lse = tl.where(member_q, top + tl.log(tl.where(member_q, denom, 1.0)), 0.0)
        lse_ptrs = (lse_ptr + row * stride_lb + s64[:, None] * stride_ls + head * stride_lh
                    + offs_q[None, :])
        tl.store(lse_ptrs, lse.to(lse_ptr.dtype.element_ty),
                 mask=keep_s[:, None] & valid_q[None, :])


@fast_launch
@triton.jit
def _attention_backward_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    S, M, Dh, scale_hi, scale_lo,
    stride_gb, stride_gs, stride_gm, stride_ge,
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_km, stride_ke,
    stride_vb, stride_vm, stride_ve,
    stride_mb, stride_ms, stride_mm,
    stride_lb, stride_ls, stride_lh,
    stride_db, stride_dm,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    chunk = tl.arange(0, CHUNK_S)
    valid_d = offs_d < Dh
    cols = (head * Dh + offs_d).to(tl.int64)
    scale = _scale_value(scale_hi, scale_lo, ACC_DTYPE)

    q, k, v, scores = _load_row_head(
        q_ptr, k_ptr, v_ptr, mask_ptr, row, 0, S, offs_q, offs_k, cols, valid_d, M,
        scale, stride_qb, stride_qm, stride_qe, stride_kb, stride_km, stride_ke, stride_vb,
        stride_vm, stride_ve, stride_mb, stride_ms, stride_mm, ACC_DTYPE, PRECISION, BLOCK_Q,
        BLOCK_K, CHUNK_S)

    dv = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC_DTYPE)
    ds_sum = tl.zeros((BLOCK_Q, BLOCK_K), dtype=ACC_DTYPE)
    # Every subset of the row, a chunk at a time, always in the same order: deterministic.
    for s0 in range(0, S, CHUNK_S):
        offs_s = s0 + chunk
        s64 = offs_s.to(tl.int64)
        member_q, member_k = _chunk_members(mask_ptr, row, offs_s, offs_q, offs_k, S, M,
                                            stride_mb, stride_ms, stride_mm, BLOCK_Q, BLOCK_K)
        lse = tl.load(lse_ptr + row * stride_lb + s64[:, None] * stride_ls + head * stride_lh
                      + offs_q[None, :], mask=member_q, other=0.0).to(ACC_DTYPE)
        live = member_q[:, :, None] & member_k[:, None, :]                       # i, j ∈ s
        probs = tl.exp(tl.where(live, scores[None, :, :] - lse[:, :, None], float("-inf")))
        # Rows of queries outside the subset have no effect on anything: not read.
        grad = tl.load(grad_ptr + row * stride_gb + s64[:, None, None] * stride_gs
                       + offs_q.to(tl.int64)[None, :, None] * stride_gm
                       + cols[None, None, :] * stride_ge,
                       mask=member_q[:, :, None] & valid_d[None, None, :],
                       other=0.0).to(ACC_DTYPE)
        grad_flat = tl.reshape(grad, (CHUNK_S * BLOCK_Q, BLOCK_D))
        # dV += Σ_s P^sᵀ dO^s: keys × (subset, query) times (subset, query) × features.
        probs_t = tl.reshape(tl.permute(probs, (2, 0, 1)),
                             (BLOCK_K, CHUNK_S * BLOCK_Q))
        dv += _matmul(probs_t, grad_flat, PRECISION, ACC_DTYPE)
        dprobs = _matmul(grad_flat, tl.trans(v), PRECISION, ACC_DTYPE)
        dprobs = tl.reshape(dprobs, (CHUNK_S, BLOCK_Q, BLOCK_K))
        row_term = tl.sum(probs * dprobs, axis=2)                                # D^s_i
        ds_sum += tl.sum(probs * (dprobs - row_term[:, :, None]), axis=0)

    ds_sum = ds_sum * scale
    dq = _matmul(ds_sum, k, PRECISION, ACC_DTYPE, True)                          # [BQ, BD]
    dk = _matmul(tl.trans(ds_sum), q, PRECISION, ACC_DTYPE, True)                # [BK, BD]

    # Gradients are contiguous [B, M, E]; unused tokens get exact zeros.
    _store_rows(dq_ptr, row, offs_q, cols, M, valid_d, dq, stride_db, stride_dm)
    _store_rows(dk_ptr, row, offs_k, cols, M, valid_d, dk, stride_db, stride_dm)
    _store_rows(dv_ptr, row, offs_k, cols, M, valid_d, dv, stride_db, stride_dm)


@triton.jit
def _store_rows(ptr, row, offs, cols, M, valid_d, value, stride_b, stride_m):
    """Store a ``[rows, BLOCK_D]`` head slice of a ``[B, M, E]`` gradient (rows < M only)."""
    tile = row * stride_b + offs.to(tl.int64)[:, None] * stride_m + cols[None, :]
    tl.store(ptr + tile, value.to(ptr.dtype.element_ty),
             mask=(offs < M)[:, None] & valid_d[None, :])


def _per_subset_strides(t: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    """(b, s, rest...) strides of a tensor shaped ``[B, (S,) ...]`` like the mask's leading
    axes (s stride 0 for a ``[B, M]`` mask)."""
    if mask.dim() == 2:
        return (t.stride(0), 0, *t.stride()[1:])
    return tuple(t.stride())


def _blocks(S: int, M: int, Dh: int, backward: bool = False,
            columns: bool = False) -> tuple[int, int, int, int, int]:
    """BLOCK_Q, BLOCK_K, BLOCK_D, CHUNK_S, num_warps.

    Keys (BLOCK_K) and Dh are padded to powers of two of at least 16 (the smallest
    ``tl.dot``). Queries (BLOCK_Q) are padded only to a power of two, and to at least
    ``16 / CHUNK_S``: a chunk's queries are the rows of its ``[CHUNK_S·BLOCK_Q, ·]`` products,
    so at M = 8 the per-subset products do half the work they would with queries padded to 16.
    A chunk's ``[CHUNK_S, BLOCK_Q, max(BLOCK_K, BLOCK_D)]`` working set stays within a register
    budget on the GPU, half as large for the backward, which holds three such arrays (P, dP,
    dO) where the forward holds one: compiled for sm_90, the issue's shape (M = 8, E = 256, 4
    heads, 255 subsets) with queries padded to 16 spilled 344 bytes a thread in the float32
    backward with 8 subsets a chunk, 32 with 4 (tests/_compile_sm90.py --report). With 8-row
    query blocks and 8 subsets a chunk it takes 98 registers and no spill with Triton 3.6 (the
    GPU machines' version; 90 with 16-row blocks and 4 subsets a chunk); Triton 3.9's compiler
    spills this backward with either layout. Static PTX counts put the loop at half the
    instructions per subset of the 16-row layout. In the interpreter, where every
    loop step costs interpreted operations, chunks are large.
    ``columns`` (float64 compiled, see :func:`_matmul_by_columns`) takes one subset a chunk.
    """
    block_k = max(16, next_power_of_2(max(M, 1)))
    block_q = next_power_of_2(max(M, 1))
    block_d = max(16, next_power_of_2(max(Dh, 1)))
    budget = 1 << 16 if triton_interpreting() else (4096 if backward else 8192)
    chunk_s = min(next_power_of_2(max(S, 1)),
                  max(1, budget // (block_q * max(block_k, block_d))), 64)
    if columns:
        chunk_s = 1   # the column loop's extra work grows with the chunk's rows
    block_q = max(block_q, 16 // chunk_s)
    rows = chunk_s * block_q
    warps = 8 if block_k * block_d >= 4096 or rows * block_d >= budget else 4
    return block_q, block_k, block_d, chunk_s, warps


def _precision(dtype: torch.dtype) -> str:
    """float32 inputs keep float32 accuracy (no TF32 truncation) unless the user allowed TF32
    for float32 matrix products (``torch.set_float32_matmul_precision("high")`` or
    ``"medium"``), as PyTorch's own matmuls do; float16 / bfloat16 values are exact in TF32, so
    their dots use the tensor cores at no loss on the inputs. float64 products are exact:
    ``tl.dot`` in the interpreter, :func:`_matmul_by_columns` ("columns") when compiled."""
    if dtype == torch.float64:
        return "ieee" if triton_interpreting() else "columns"
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"


def subset_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor, num_heads: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implementation of ``mmfast::subset_attention``.

    Args:
        q, k, v: ``[B, M, E]``, one dtype, any strides; E divisible by num_heads.
        mask: bool ``[B, M]`` or ``[B, S, M]``, any strides (stride 0 for a shared bank).
        num_heads: H; scale: the score scale.
    Returns:
        ``out``: contiguous ``[B, (S,) M, E]`` in q.dtype, zero rows for tokens outside a subset;
        ``lse``: contiguous ``[B, (S,) H, M]``, float32 (float64 for float64 inputs), the
        log-sum-exp of each query's scores over its subset's keys, 0 for queries outside the
        subset (see the module docstring).
    """
    B, M, E = q.shape
    H = num_heads
    Dh = E // H
    mask_bytes, S, (smb, sms, smm) = mask_layout(mask)
    out = torch.empty((*mask.shape[:-1], M, E), dtype=q.dtype, device=q.device)
    lse = torch.empty((*mask.shape[:-1], H, M), dtype=torch_acc_dtype(q.dtype), device=q.device)
    if B * S * M == 0:
        return out, lse
    if M <= SMALL_M:
        _small_forward(q, k, v, mask_bytes, S, (smb, sms, smm), out, lse, mask, H, scale)
        return out, lse
    precision = _precision(q.dtype)
    block_q, block_k, block_d, chunk_s, warps = _blocks(S, M, Dh,
                                                        columns=precision == "columns")
    chunks = cdiv(S, chunk_s)
    per_program = cdiv(chunks, _splits(chunks, B, H)) * chunk_s
    grid = (B, H, cdiv(S, per_program))
    sob, sos, som, _ = _per_subset_strides(out, mask)
    slb, sls, slh, _ = _per_subset_strides(lse, mask)
    _attention_forward_kernel[grid](
        q, k, v, mask_bytes, out, lse,
        S, M, Dh, per_program, *split_float(scale),
        *q.stride(), *k.stride(), *v.stride(),
        smb, sms, smm,
        sob, sos, som,
        slb, sls, slh,
        ACC_DTYPE=acc_dtype(q.dtype), PRECISION=precision,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, CHUNK_S=chunk_s,
        num_warps=warps,
    )
    return out, lse


def subset_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
                              lse: torch.Tensor, num_heads: int,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Implementation of ``mmfast::subset_attention_backward``.

    Args:
        grad_out: ``[B, (S,) M, E]`` upstream gradient, any strides; rows of tokens outside a
            subset are never read.
        q, k, v, mask, num_heads, scale: the forward's inputs.
        out: the forward's output (unused: the row term D is recomputed from P and dP).
        lse: the forward's saved log-sum-exp, ``[B, (S,) H, M]``.
    Returns:
        ``(dq, dk, dv)``, contiguous ``[B, M, E]`` in q.dtype, summed over the subsets.
    """
    B, M, E = q.shape
    H = num_heads
    Dh = E // H
    mask_bytes, S, (smb, sms, smm) = mask_layout(mask)
    dq = torch.empty((B, M, E), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if dq.numel() == 0:
        return dq, dk, dv
    if S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if M <= SMALL_M:
        _small_backward(grad_out, q, k, v, mask_bytes, S, (smb, sms, smm), lse, mask, H, scale,
                        dq, dk, dv)
        return dq, dk, dv
    precision = _precision(q.dtype)
    block_q, block_k, block_d, chunk_s, warps = _blocks(S, M, Dh, backward=True,
                                                        columns=precision == "columns")
    slb, sls, slh, _ = _per_subset_strides(lse, mask)
    _attention_backward_kernel[(B, H)](
        grad_out, q, k, v, mask_bytes, lse, dq, dk, dv,
        S, M, Dh, *split_float(scale),
        *_per_subset_strides(grad_out, mask),
        *q.stride(), *k.stride(), *v.stride(),
        smb, sms, smm,
        slb, sls, slh,
        dq.stride(0), dq.stride(1),
        ACC_DTYPE=acc_dtype(q.dtype), PRECISION=precision,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, CHUNK_S=chunk_s,
        num_warps=warps,
    )
    return dq, dk, dv


def _splits(chunks: int, B: int, H: int) -> int:
    """Programs a row's subsets are split over in the forward: on the GPU, enough for about
    2048 programs when rows × heads alone would leave SMs idle (each split recomputes the
    scores, a small cost next to its chunks); one in the interpreter."""
    return 1 if triton_interpreting() else max(1, min(chunks, cdiv(2048, B * H)))


def _small_forward(q, k, v, mask_bytes, S, mask_strides, out, lse, mask, H, scale):
    """:func:`subset_attention_forward` for M <= SMALL_M (kernels/subset_attention_small.py)."""
    B, M, E = q.shape
    Dh = E // H
    block_m, chunk_s, di, dl, warps = small_blocks(S, M, Dh, q.element_size())
    per_program = cdiv(cdiv(S, chunk_s), _splits(cdiv(S, chunk_s), B, H)) * chunk_s
    sob, sos, som, _ = _per_subset_strides(out, mask)
    slb, sls, slh, _ = _per_subset_strides(lse, mask)
    _small_forward_kernel[(B, H, cdiv(S, per_program))](
        q, k, v, mask_bytes, out, lse,
        S, M, Dh, per_program, *split_float(scale),
        *q.stride(), *k.stride(), *v.stride(),
        *mask_strides,
        sob, sos, som,
        slb, sls, slh,
        ACC_DTYPE=acc_dtype(q.dtype), BLOCK_M=block_m, CHUNK_S=chunk_s, DI=di, DL=dl,
        MASK_ROW=mask_row(mask_bytes, M, block_m, mask_strides),
        num_warps=warps,
    )


def _small_backward(grad_out, q, k, v, mask_bytes, S, mask_strides, lse, mask, H, scale,
                    dq, dk, dv):
    """:func:`subset_attention_backward` for M <= SMALL_M (kernels/subset_attention_small.py)."""
    B, M, E = q.shape
    Dh = E // H
    block_m, chunk_s, di, dl, warps = small_blocks(S, M, Dh, q.element_size(), backward=True)
    slb, sls, slh, _ = _per_subset_strides(lse, mask)
    _small_backward_kernel[(B, H)](
        grad_out, q, k, v, mask_bytes, lse, dq, dk, dv,
        S, M, Dh, *split_float(scale),
        *_per_subset_strides(grad_out, mask),
        *q.stride(), *k.stride(), *v.stride(),
        *mask_strides,
        slb, sls, slh,
        dq.stride(0), dq.stride(1),
        ACC_DTYPE=acc_dtype(q.dtype), BLOCK_M=block_m, CHUNK_S=chunk_s, DI=di, DL=dl,
        MASK_ROW=mask_row(mask_bytes, M, block_m, mask_strides),
        num_warps=warps,
    )
