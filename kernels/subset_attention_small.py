"""Subset attention for a few tokens (M <= SMALL_M): every product in registers, no ``tl.dot``.

Same definitions, saved log-sum-exp convention and backward algebra as
:mod:`mmfast.kernels.subset_attention`; what differs is how a program holds its tiles.

Why a second formulation. ``tl.dot`` pads both token axes to 16, so at M = 8 half of every
product is padding, and each per-subset product goes through shared memory to reach the dot
operand layouts. Compiled for sm_90 (Triton 3.6, the issue-5 shape: M = 8, E = 256, 4 heads, 255
subsets, float32), the general backward's loop issues about 240 shared-memory loads and stores per
thread for 16 elements of the upstream gradient, with barriers between them; the H100 measured
it at 6% of copy bandwidth. Here the tiles are five-dimensional, with axes

    (dl, i, j, s, di):  feature d = dl·DI + di, query i, key j, subset s of the chunk,

laid out (by Triton's coalescing of the largest load, see :func:`small_blocks`) with DI
features in each thread's registers, the dl axis across lanes, queries across the remaining lanes
and the warps, and keys and subsets in registers. Then:

- the softmax over keys, ``out = Σ_j P v_j`` and the backward's sums over the subsets of a chunk
  are sums within a thread;
- the row term ``D^s_i = dO^s_i · out^s_i`` is a sum over the lanes of dl (a few shuffles);
- nothing goes through shared memory inside the subset loop.

That layout is Triton 3.6's (the GPU machines' version), checked in the compiled sm_90 code.
Triton 3.9 breaks the coalescing tie between equally contiguous axes the other way round and puts
subsets and queries on the lanes first: the kernels compile and compute the same values, with
more shuffles (static PTX: about 400 a thread per forward chunk instead of none).

Every thread of a query's lanes computes that query's probabilities (P is replicated DL times):
exp is cheap next to the 16 multiply-adds per upstream-gradient element, and the replication is
what keeps the products in registers.

Backward without the products ``dO Vᵀ`` per subset (which would be a sum over lanes per key):

    W_ij = Σ_s P^s_ij dO^s_i            (registers: [keys, DI] per thread)
    dV_j = Σ_i W_ij
    Σ_s dS^s_ij = Σ_s P^s_ij (dP^s_ij - D^s_i) = W_ij · v_j - Σ_s P^s_ij D^s_i

where ``D^s_i = dO^s_i · out^s_i`` and ``out^s_i = Σ_j P^s_ij v_j`` is recomputed (no pass over
the saved output). The sums over s run in a fixed order in each program: deterministic.

Membership is read once per subset as a bit set (bit m: modality m in the subset), from the
mask's bytes by strides (stride-0 banks are never materialised); a token in none of a program's
subsets is never read, so NaN there cannot leak.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from mmfast.backend import triton_interpreting
from mmfast.kernels._common import next_power_of_2
from mmfast.kernels._launch import fast_launch
from mmfast.kernels._masks import bit_or

# Keys and queries are held in registers per thread (keys × DI accumulators in the backward):
# beyond 8 tokens the register budget forces narrower feature slices and the general kernel
# (tl.dot, tokens padded to 16 anyway) is the better fit. MMFAST_ATTENTION_SMALL_M=0 sends every
# M to the general kernel (read at import; for comparing the two on a GPU).
SMALL_M = int(os.environ.get("MMFAST_ATTENTION_SMALL_M", "8"))
if not 0 <= SMALL_M <= 32:     # token sets are int32 bit sets
    raise ValueError(f"MMFAST_ATTENTION_SMALL_M must be between 0 and 32, got {SMALL_M}")


@triton.jit
def _subset_bits(mask_ptr, row, s5, last, M, stride_mb, stride_ms, stride_mm,
                 BLOCK_M: tl.constexpr, MASK_ROW: tl.constexpr):
    """int32 ``[1, 1, 1, CHUNK_S, 1]``: bit m set when modality m is in subset s5 of ``row``
    (0 past ``last``). The row's bytes run along the last axis, in each thread's registers.

    With MASK_ROW >= 4 (see ``_masks.mask_row``: each subset's M bytes one aligned block, M a
    power of two) the row is read as 32-bit words and each word's four 0/1 bytes (masks are
    bool) are gathered into four bits by one multiply: byte k of w times 2^(24 - 7m) lands on
    bit 24 + k when m = k, and below bit 20 or past bit 31 otherwise, so
    ``(w · 0x01020408) >> 24`` is the nibble b0 + 2·b1 + 4·b2 + 8·b3. Byte by byte, the same
    decoding took four times the instructions (sm_90 PTX, Triton 3.6)."""
    start = row * stride_mb + s5.to(tl.int64) * stride_ms
    if MASK_ROW >= 4 and MASK_ROW == BLOCK_M:      # rows start on multiples of BLOCK_M bytes
        # Offsets counted in whole rows of BLOCK_M = M bytes (mask_row checked the strides are
        # multiples of it), so the compiler knows each row's words are one aligned vector.
        w5 = tl.arange(0, BLOCK_M // 4)[None, None, None, None, :]
        words = mask_ptr.to(tl.pointer_type(tl.int32)) + (start // BLOCK_M) * (BLOCK_M // 4)
        word = tl.load(words + w5, mask=s5 < last, other=0).to(tl.uint32, bitcast=True)
        nibble = ((word * 0x01020408) >> 24).to(tl.int32, bitcast=True)
        return tl.reduce(nibble << (4 * w5), 4, bit_or, keep_dims=True)
    m5 = tl.arange(0, BLOCK_M)[None, None, None, None, :]
    byte = tl.load(mask_ptr + start + m5 * stride_mm, mask=(s5 < last) & (m5 < M), other=0)
    return tl.reduce(tl.where(byte != 0, 1 << m5, 0), 4, bit_or, keep_dims=True)


@triton.jit
def _has(bits, idx5):
    """bool: token idx5 is in the bit set ``bits`` (broadcast over both shapes)."""
    return ((bits >> idx5) & 1) != 0


@triton.jit
def _used_bits(mask_ptr, row, first, last, M, stride_mb, stride_ms, stride_mm,
               BLOCK_M: tl.constexpr, MASK_ROW: tl.constexpr, CHUNK_S: tl.constexpr):
    """int32 ``[1, 1, 1, 1, 1]``: the tokens in at least one subset ``first <= s < last``."""
    s5 = tl.arange(0, CHUNK_S)[None, None, None, :, None]
    used = tl.zeros((1, 1, 1, 1, 1), dtype=tl.int32)
    for s0 in range(first, last, CHUNK_S):
        bits = _subset_bits(mask_ptr, row, s0 + s5, last, M, stride_mb, stride_ms, stride_mm,
                            BLOCK_M, MASK_ROW)
        used = used | tl.reduce(bits, 3, bit_or, keep_dims=True)
    return used


@triton.jit
def _head_tile(ptr, row, tok5, i5, used, d5, cols, Dh, stride_b, stride_m, stride_e,
               ACC_DTYPE: tl.constexpr):
    """A head slice of q, k or v as a 5-D tile, upcast to ACC_DTYPE; tokens outside ``used``
    are 0 and never read. Tokens run along the axis of tok5: queries (tok5 = i5) give
    ``[DL, BM, 1, 1, DI]``; keys (tok5 = j5) give ``[DL, BM, BM, 1, DI]``, the same keys for
    every query. That query axis costs nothing in memory (the lanes of different queries read
    the same addresses, once per program), but it makes Triton lay out keys the way the upstream
    gradient's tile is laid out, with keys in registers: compiled for sm_90, a ``[DL, 1, BM, 1,
    DI]`` key tile took its own layout (keys across warps), and the loop's sums over keys then
    went through shared memory."""
    ptrs = ptr + row * stride_b + (tok5 + 0 * i5).to(tl.int64) * stride_m + cols * stride_e
    return tl.load(ptrs, mask=_has(used, tok5) & (d5 < Dh), other=0.0).to(ACC_DTYPE)


@triton.jit
def _axes(head, Dh, BLOCK_M: tl.constexpr, CHUNK_S: tl.constexpr, DI: tl.constexpr,
          DL: tl.constexpr):
    """Index tiles of the five axes (dl, i, j, s, di): queries i5, keys j5, the chunk's
    subsets s5, features d5 and their int64 columns in the ``[.., E]`` rows."""
    i5 = tl.arange(0, BLOCK_M)[None, :, None, None, None]
    j5 = tl.arange(0, BLOCK_M)[None, None, :, None, None]
    s5 = tl.arange(0, CHUNK_S)[None, None, None, :, None]
    d5 = (tl.arange(0, DL)[:, None, None, None, None] * DI
          + tl.arange(0, DI)[None, None, None, None, :])
    cols = (head * Dh + d5).to(tl.int64)
    return i5, j5, s5, d5, cols


@triton.jit
def _sum_features(x):
    """Sum over the feature axes (dl, di), keeping the 5-D shape."""
    return tl.sum(tl.sum(x, axis=4, keep_dims=True), axis=0, keep_dims=True)


@triton.jit
def _row_tiles(q_ptr, k_ptr, v_ptr, mask_ptr, row, first, last, i5, j5, d5, cols, M, Dh, scale,
               stride_qb, stride_qm, stride_qe, stride_kb, stride_km, stride_ke, stride_vb,
               stride_vm, stride_ve, stride_mb, stride_ms, stride_mm, ACC_DTYPE: tl.constexpr,
               BLOCK_M: tl.constexpr, CHUNK_S: tl.constexpr, MASK_ROW: tl.constexpr):
    """A program's head slices q ``[DL, BM, 1, 1, DI]``, k and v ``[DL, BM, BM, 1, DI]`` (only
    tokens in one of the subsets ``[first, last)``) and the scores ``scale · q kᵀ``
    ``[1, BM, BM, 1, 1]``, computed once and shared by all the subsets."""
    used = _used_bits(mask_ptr, row, first, last, M, stride_mb, stride_ms, stride_mm, BLOCK_M,
                      MASK_ROW, CHUNK_S)
    q = _head_tile(q_ptr, row, i5, i5, used, d5, cols, Dh, stride_qb, stride_qm, stride_qe,
                   ACC_DTYPE)
    k = _head_tile(k_ptr, row, j5, i5, used, d5, cols, Dh, stride_kb, stride_km, stride_ke,
                   ACC_DTYPE)
    v = _head_tile(v_ptr, row, j5, i5, used, d5, cols, Dh, stride_vb, stride_vm, stride_ve,
                   ACC_DTYPE)
    return q, k, v, _sum_features(q * k) * scale


@fast_launch
@triton.jit
def _small_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    S, M, Dh, subsets_per_program, scale_hi, scale_lo,
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_km, stride_ke,
    stride_vb, stride_vm, stride_ve,
    stride_mb, stride_ms, stride_mm,
    stride_ob, stride_os, stride_om,
    stride_lb, stride_ls, stride_lh,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_S: tl.constexpr,
    DI: tl.constexpr, DL: tl.constexpr, MASK_ROW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first = tl.program_id(2) * subsets_per_program
    last = tl.minimum(first + subsets_per_program, S)
    i5, j5, s5, d5, cols = _axes(head, Dh, BLOCK_M, CHUNK_S, DI, DL)
    scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)

    q, k, v, scores = _row_tiles(
        q_ptr, k_ptr, v_ptr, mask_ptr, row, first, last, i5, j5, d5, cols, M, Dh, scale,
        stride_qb, stride_qm, stride_qe, stride_kb, stride_km, stride_ke, stride_vb, stride_vm,
        stride_ve, stride_mb, stride_ms, stride_mm, ACC_DTYPE, BLOCK_M, CHUNK_S, MASK_ROW)

    for s0 in range(first, last, CHUNK_S):
        s = s0 + s5
        bits = _subset_bits(mask_ptr, row, s, last, M, stride_mb, stride_ms, stride_mm, BLOCK_M,
                            MASK_ROW)
        member_q = _has(bits, i5)                                          # [1, BM, 1, CS, 1]
        masked = tl.where(_has(bits, j5), scores, float("-inf"))           # [1, BM, BM, CS, 1]
        top = tl.max(masked, axis=2, keep_dims=True)
        # An empty subset has no finite score: shift by 0 so every exp below is exp(-inf) = 0.
        top = tl.where(top == float("-inf"), 0.0, top)
        e = tl.exp(masked - top)
        denom = tl.sum(e, axis=2, keep_dims=True)
        # A query in the subset has its own key in it (denominator >= 1); others get zeros.
        inv = tl.where(member_q, 1.0 / tl.where(member_q, denom, 1.0), 0.0)
        out = tl.sum(e * inv * v, axis=2, keep_dims=True)                  # [DL, BM, 1, CS, DI]

        s64 = s.to(tl.int64)
        keep = (s < last) & (i5 < M)
        tl.store(out_ptr + row * stride_ob + s64 * stride_os + i5.to(tl.int64) * stride_om + cols,
                 out.to(out_ptr.dtype.element_ty), mask=keep & (d5 < Dh))
        lse = tl.where(member_q, top + tl.log(tl.where(member_q, denom, 1.0)), 0.0)
        tl.store(lse_ptr + row * stride_lb + s64 * stride_ls + head * stride_lh + i5,
                 lse.to(lse_ptr.dtype.element_ty), mask=keep)


@fast_launch
@triton.jit
def _small_backward_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    S, M, Dh, scale_hi, scale_lo,
    stride_gb, stride_gs, stride_gm, stride_ge,
    stride_qb, stride_qm, stride_qe,
    stride_kb, stride_km, stride_ke,
    stride_vb, stride_vm, stride_ve,
    stride_mb, stride_ms, stride_mm,
    stride_lb, stride_ls, stride_lh,
    stride_db, stride_dm,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_S: tl.constexpr,
    DI: tl.constexpr, DL: tl.constexpr, MASK_ROW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i5, j5, s5, d5, cols = _axes(head, Dh, BLOCK_M, CHUNK_S, DI, DL)
    scale = tl.cast(scale_hi, ACC_DTYPE) + tl.cast(scale_lo, ACC_DTYPE)

    q, k, v, scores = _row_tiles(
        q_ptr, k_ptr, v_ptr, mask_ptr, row, 0, S, i5, j5, d5, cols, M, Dh, scale,
        stride_qb, stride_qm, stride_qe, stride_kb, stride_km, stride_ke, stride_vb, stride_vm,
        stride_ve, stride_mb, stride_ms, stride_mm, ACC_DTYPE, BLOCK_M, CHUNK_S, MASK_ROW)

    w = tl.zeros((DL, BLOCK_M, BLOCK_M, 1, DI), dtype=ACC_DTYPE)          # W_ij, per feature
    p_d = tl.zeros((1, BLOCK_M, BLOCK_M, 1, 1), dtype=ACC_DTYPE)          # Σ_s P^s_ij D^s_i
    # Every subset of the row, a chunk at a time, always in the same order: deterministic.
    for s0 in range(0, S, CHUNK_S):
        s = s0 + s5
        s64 = s.to(tl.int64)
        bits = _subset_bits(mask_ptr, row, s, S, M, stride_mb, stride_ms, stride_mm, BLOCK_M,
                            MASK_ROW)
        member_q = _has(bits, i5)
        lse = tl.load(lse_ptr + row * stride_lb + s64 * stride_ls + head * stride_lh + i5,
                      mask=member_q, other=0.0).to(ACC_DTYPE)
        probs = tl.exp(tl.where(member_q & _has(bits, j5), scores - lse, float("-inf")))
        # Rows of queries outside the subset have no effect on anything: not read.
        grad = tl.load(grad_ptr + row * stride_gb + s64 * stride_gs
                       + i5.to(tl.int64) * stride_gm + cols * stride_ge,
                       mask=member_q & (d5 < Dh), other=0.0).to(ACC_DTYPE)  # [DL, BM, 1, CS, DI]
        out = tl.sum(probs * v, axis=2, keep_dims=True)                    # out^s_i
        row_term = _sum_features(grad * out)                               # D^s_i
        w += tl.sum(probs * grad, axis=3, keep_dims=True)
        p_d += tl.sum(probs * row_term, axis=3, keep_dims=True)

    dv = tl.sum(w, axis=1, keep_dims=True)                                 # [DL, 1, BM, 1, DI]
    ds = (_sum_features(w * v) - p_d) * scale                              # Σ_s dS^s_ij
    dq = tl.sum(ds * k, axis=2, keep_dims=True)                            # [DL, BM, 1, 1, DI]
    dk = tl.sum(ds * q, axis=1, keep_dims=True)                            # [DL, 1, BM, 1, DI]

    # Gradients are contiguous [B, M, E]; unused tokens get exact zeros.
    valid_d = d5 < Dh
    base = dq_ptr.dtype.element_ty
    tl.store(dq_ptr + row * stride_db + i5.to(tl.int64) * stride_dm + cols, dq.to(base),
             mask=(i5 < M) & valid_d)
    tl.store(dk_ptr + row * stride_db + j5.to(tl.int64) * stride_dm + cols, dk.to(base),
             mask=(j5 < M) & valid_d)
    tl.store(dv_ptr + row * stride_db + j5.to(tl.int64) * stride_dm + cols, dv.to(base),
             mask=(j5 < M) & valid_d)


def small_blocks(S: int, M: int, Dh: int, itemsize: int,
                 backward: bool = False) -> tuple[int, int, int, int, int]:
    """BLOCK_M, CHUNK_S, DI, DL, num_warps for :func:`_small_forward_kernel` and
    :func:`_small_backward_kernel`.

    DI: features a thread reads as one vector (4: 16 bytes of float32, 8 of half precision;
    2 for float64). DL = BLOCK_D / DI lanes span a head slice; the remaining lanes and the warps
    take queries. Triton 3.6's coalescing orders the upstream-gradient tile's axes by
    contiguity, then by position: (di, dl, i, j, s), which is why the tiles put dl first. Warps
    are capped so that none falls on the key or subset axes (sums over those would cross warps
    through shared memory). CHUNK_S keeps the chunk's probabilities and gradient rows within a
    register budget: compiled for sm_90 with Triton 3.6 at M = 8, Dh = 64, float32, 4 subsets
    a forward chunk take 80 registers and 2 a backward chunk 168 (3 blocks of 4 warps an SM;
    4 subsets took 221), no spills (tests/_compile_sm90.py --report).
    """
    block_m = next_power_of_2(max(M, 1))
    di = 2 if itemsize >= 8 else 4
    block_d = max(di, next_power_of_2(max(Dh, 1)))
    dl = block_d // di
    if triton_interpreting():
        chunk_s = min(next_power_of_2(max(S, 1)), 64)   # each loop step costs interpreted ops
    else:
        # The backward holds W, v and the chunk's gradient rows: half the forward's chunk.
        budget = 16 if backward else 32
        chunk_s = min(next_power_of_2(max(S, 1)), max(1, budget // block_m))
    lanes_on_queries = max(1, 32 // dl)
    warps = max(1, min(4, block_m // lanes_on_queries))
    return block_m, chunk_s, di, dl, warps
