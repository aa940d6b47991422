"""Subset masks as the subset kernels read them (pool, PoE, attention): layout on the host,
membership tiles and the modalities a program's subsets use in the kernels.

A mask ``[B, M]`` (one subset per row) or ``[B, S, M]`` (a bank, possibly ``expand``-ed with
stride 0 on B) is read as bytes by strides, never materialised. Every thread of a program needs
all the membership bytes of its chunk of subsets; where each subset's ``M`` bytes form one
aligned, contiguous block (M a power of two: the usual bool masks and banks), they are read as
vector loads rather than byte by byte (``MASK_ROW``; the pool and PoE kernels, whose blocks
of modalities are exactly M wide, use it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def mask_layout(mask: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int, int]]:
    """The mask as bytes (bool and uint8 share a layout), S, and its (b, s, m) strides;
    ``[B, M]`` is one subset per row (stride 0 on s)."""
    as_bytes = mask.view(torch.uint8)
    if mask.dim() == 2:
        return as_bytes, 1, (mask.stride(0), 0, mask.stride(1))
    return as_bytes, mask.shape[1], tuple(mask.stride())


def mask_row(mask_bytes: torch.Tensor, M: int, block_m: int, strides: tuple[int, int, int]) -> int:
    """MASK_ROW for :func:`load_members` (and the small attention kernels' word reads): the
    alignment, up to 16 bytes (one vector load), of every subset's membership row when that row
    is one contiguous block of BLOCK_M = M bytes (M a power of two) for every row b and subset;
    1 (byte loads) otherwise. For M <= 16 the strides are then multiples of M."""
    skb, sks, skm = strides
    if not (skm == 1 and block_m == M and M > 1 and M & (M - 1) == 0):
        return 1
    align = min(M, 16)
    return align if all(v % align == 0 for v in (skb, sks, mask_bytes.data_ptr())) else 1


# Membership bytes a step of :func:`members_used` reads in kernels with small chunks: with
# BLOCK_M modalities, USED_BYTES // BLOCK_M subsets a step (8 bytes a thread at 4 warps).
USED_BYTES = tl.constexpr(1024)


@triton.jit
def load_members(mask_ptr, row, offs_s, S, offs_m, M, stride_kb, stride_ks, stride_km,
                 MASK_ROW: tl.constexpr, BLOCK_M: tl.constexpr):
    """bool ``[CHUNK_S, BLOCK_M]``: whether modality offs_m is in subset offs_s of ``row``
    (False past S and M). With MASK_ROW > 1 (:func:`mask_row`: offs_m is ``arange(BLOCK_M)``
    and BLOCK_M == M) a subset's row is read in aligned vector loads."""
    if MASK_ROW > 1:
        start = tl.multiple_of(row * stride_kb + offs_s.to(tl.int64) * stride_ks, MASK_ROW)
        member = tl.load(mask_ptr + start[:, None] + tl.arange(0, BLOCK_M)[None, :],
                         mask=(offs_s < S)[:, None], other=0)
    else:
        member = tl.load(mask_ptr + row * stride_kb + offs_s.to(tl.int64)[:, None] * stride_ks
                         + offs_m.to(tl.int64)[None, :] * stride_km,
                         mask=(offs_s < S)[:, None] & (offs_m < M)[None, :], other=0)
    return member != 0


@triton.jit
def members_used(mask_ptr, row, first, last, offs_m, M, stride_kb, stride_ks, stride_km,
                 MASK_ROW: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_S: tl.constexpr):
    """bool ``[BLOCK_M]``: the modalities offs_m that at least one of the subsets
    ``first <= s < last`` of ``row`` holds, from ``[CHUNK_S, BLOCK_M]`` mask tiles. Only their
    rows of the features need be read (a missing modality's, possibly NaN, never are). The
    tiles are combined element-wise and reduced over the subsets once, after the loop; callers
    whose own chunks are small pass a larger CHUNK_S here (USED_BYTES membership bytes a
    step), so that this pass costs little beside the kernel's own loop."""
    chunk = tl.arange(0, CHUNK_S)
    used = tl.zeros((CHUNK_S, BLOCK_M), dtype=tl.int32)
    for s0 in range(first, last, CHUNK_S):
        member = load_members(mask_ptr, row, s0 + chunk, last, offs_m, M, stride_kb, stride_ks,
                              stride_km, MASK_ROW, BLOCK_M)
        used = tl.maximum(used, member.to(tl.int32))
    return tl.max(used, axis=0) > 0


@triton.jit
def bit_or(a, b):
    """Combine function of ``tl.reduce`` for bit sets."""
    return a | b


@triton.jit
def subset_bits(mask_ptr, row, offs_s, S, M, stride_kb, stride_ks, stride_km,
                MASK_ROW: tl.constexpr, BLOCK_M: tl.constexpr):
    """int32 ``[CHUNK_S, 1, 1]`` (BLOCK_M <= 32): bit m set when modality m is in subset
    ``offs_s`` (``[CHUNK_S, 1, 1]``) of ``row``; 0 past S.

    For kernels whose tiles are ``[CHUNK_S, BLOCK_M, BLOCK_D]`` with a few adjacent features in
    each thread's registers: the row's bytes (or words) are read along the last axis, the axis
    a thread holds in registers, so each thread gets whole rows without a layout conversion.
    With MASK_ROW >= 4 (:func:`mask_row`: every subset's M bytes one aligned block, M a power of
    two) the row is read as 32-bit words and each word's four 0/1 bytes are gathered into four
    bits by one multiply: byte k of w times 2^(24 - 7m) lands on bit 24 + k when m = k and
    below bit 20 or past bit 31 otherwise, so ``(w · 0x01020408) >> 24`` is the nibble
    b0 + 2·b1 + 4·b2 + 8·b3. That needs bytes of 0 or 1, which is what PyTorch's bool holds
    (a bool tensor viewed from other bytes is outside its contract); the byte path tests
    ``!= 0``. Words are read only when MASK_ROW == BLOCK_M, so that each row starts on a
    multiple of BLOCK_M bytes (mask_row aligns to at most 16)."""
    start = row * stride_kb + offs_s.to(tl.int64) * stride_ks
    if MASK_ROW >= 4 and MASK_ROW == BLOCK_M:
        # Offsets counted in whole rows of BLOCK_M = M bytes (mask_row checked the strides are
        # multiples of M), so the compiler knows each row's words are one aligned vector.
        w = tl.arange(0, BLOCK_M // 4)[None, None, :]
        words = mask_ptr.to(tl.pointer_type(tl.int32)) + (start // BLOCK_M) * (BLOCK_M // 4)
        word = tl.load(words + w, mask=offs_s < S, other=0).to(tl.uint32, bitcast=True)
        nibble = ((word * 0x01020408) >> 24).to(tl.int32, bitcast=True)
        return tl.reduce(nibble << (4 * w), 2, bit_or, keep_dims=True)
    m = tl.arange(0, BLOCK_M)[None, None, :]
    byte = tl.load(mask_ptr + start + m.to(tl.int64) * stride_km, mask=(offs_s < S) & (m < M),
                   other=0)
    return tl.reduce(tl.where(byte != 0, 1 << m, 0), 2, bit_or, keep_dims=True)


@triton.jit
def chunk_flags(mask_ptr, row, offs_s, S, offs_m, M, stride_kb, stride_ks, stride_km,
                MASK_ROW: tl.constexpr, BLOCK_M: tl.constexpr, ROW_BITS: tl.constexpr):
    """int32 ``[CHUNK_S, BLOCK_M, 1]``: 1 where modality offs_m is in subset offs_s
    (``[CHUNK_S]``) of ``row``, else 0 (0 past S and M). With ROW_BITS (BLOCK_M <= 32) each
    thread reads whole rows as a bit set (:func:`subset_bits`), in the layout of the kernel's
    ``[CHUNK_S, BLOCK_M, BLOCK_D]`` selections (pool, PoE), and takes one bit a flag;
    otherwise through :func:`load_members`."""
    if ROW_BITS:
        bits = subset_bits(mask_ptr, row, offs_s[:, None, None], S, M, stride_kb, stride_ks,
                           stride_km, MASK_ROW, BLOCK_M)
        return (bits >> offs_m[None, :, None]) & 1
    member = load_members(mask_ptr, row, offs_s, S, offs_m, M, stride_kb, stride_ks, stride_km,
                          MASK_ROW, BLOCK_M)
    return member.to(tl.int32)[:, :, None]


@triton.jit
def chunk_members(mask_ptr, row, offs_s, S, offs_m, M, stride_kb, stride_ks, stride_km,
                  MASK_ROW: tl.constexpr, BLOCK_M: tl.constexpr, ROW_BITS: tl.constexpr):
    """bool ``[CHUNK_S, BLOCK_M, 1]``: :func:`chunk_flags` as a selection mask."""
    if ROW_BITS:
        return chunk_flags(mask_ptr, row, offs_s, S, offs_m, M, stride_kb, stride_ks, stride_km,
                           MASK_ROW, BLOCK_M, ROW_BITS) != 0
    member = load_members(mask_ptr, row, offs_s, S, offs_m, M, stride_kb, stride_ks, stride_km,
                          MASK_ROW, BLOCK_M)
    return member[:, :, None]
