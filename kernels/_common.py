"""Host-side helpers shared by mmfast's Triton launchers (no kernels here).

Triton types a Python float kernel argument as float32, so a constant that must be exact in
float64 travels as two float32-representable halves ``hi + lo`` (see :func:`split_float`); the
kernel adds them in its accumulation dtype, which restores the float64 value to ~1e-16 and
costs nothing in float32.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton.language as tl

from mmfast.backend import triton_interpreting

LOG_2PI = math.log(2.0 * math.pi)


def split_float(value: float) -> tuple[float, float]:
    """``(hi, lo)``, both exactly representable in float32, with ``hi + lo ≈ value`` to about
    float64 precision."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


LOG_2PI_HI, LOG_2PI_LO = split_float(LOG_2PI)


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for host code. ``triton.cdiv`` and ``triton.next_power_of_2`` are
    constexpr functions whose wrapper costs microseconds a call, several calls a launch."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def element_budget() -> int:
    """Elements of one program's working tile: register-sized on the GPU; large under the
    interpreter, where every program costs milliseconds and big tiles mean few programs."""
    return 1 << 15 if triton_interpreting() else 4096


def num_warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1


def lane_rows(block_d: int, chunk_s: int, warps: int, itemsize: int) -> int:
    """X_ROWS (ACC_ROWS) of the ``[CHUNK_S, BLOCK_M, BLOCK_D]`` register-layout kernels (pool,
    PoE): 1 when 16-byte vectors of the features fill every lane and warp, else CHUNK_S: the
    kernels then hold their ``[BLOCK_M, BLOCK_D]`` tiles (and sums) as ``[CHUNK_S, BLOCK_M,
    BLOCK_D]``, so that the lanes the features leave run along the chunk's subsets, not the
    modalities."""
    return 1 if block_d * itemsize >= 16 * 32 * warps else chunk_s
