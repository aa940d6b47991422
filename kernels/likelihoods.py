"""Observation log-likelihoods summed over the event: bernoulli, normal, Laplace, categorical.

Parameters arrive as ``[K, B, *event]`` (K decoded latent samples), data as ``[B, *event]``
(broadcast over K); the launchers view the event axes as one axis of N elements (a copy only
when the strides do not allow a view) and every kernel reads its tensors by strides, so a
stride-0 ``log_scale`` (a scalar or per-event scale expanded to loc's shape) is never
materialised. Per (k, b) row, with ``l`` the logits and ``s = min_scale + exp(log_scale)``:

    bernoulli  Σ_n x·l − softplus(l)                softplus(l) = max(l, 0) + log(1 + exp(−|l|))
    normal     Σ_n −r²/2 − log s − log(2π)/2        r = (x − loc) / s
    laplace    Σ_n −|x − loc|/s − log(2s)
    categorical Σ_e l[e, t_e] − logsumexp_c l[e, c]

Element-wise log-probabilities are never stored: the forward accumulates them in registers
(float32, float64 for float64 inputs). Backward, with ``g = ∂L/∂out[k, b]``:

    bernoulli  ∂l = g (x − σ(l)),              ∂x = Σ_k g l
    normal     ∂loc = g r / s,                  ∂x = −Σ_k g r / s,
               ∂log_scale = g (r² − 1) e^{log_scale} / s
    laplace    ∂loc = g sign(x − loc) / s,      ∂x = −Σ_k g sign(x − loc) / s,
               ∂log_scale = g (|x − loc|/s − 1) e^{log_scale} / s
    categorical ∂l[e, c] = g (1[c = t_e] − softmax(l[e])_c)

The backward of the element-wise families gives each program a tile of (b, n) and loops over k,
so the sum over K for ∂x happens in registers in a fixed order: deterministic, no atomics.
``log_scale`` arrives as ``[Ks, Bs, N]`` with Ks in {1, K} and Bs in {1, B} (the op layer
keeps a shared scale unexpanded), and its gradient is reduced where it is made: over k in
registers when Ks = 1, over the tile's b rows when Bs = 1, with one partial row per b-block
summed afterwards in a fixed order. A per-dimension scale thus costs an ``[N]`` gradient, not
a ``[K, B, N]`` one.

The categorical kernels give each program BLOCK_R rows b of one sample k and BLOCK_E positions
(all E when they fit, so the forward's event sum stays in registers), a few hundred positions'
logits at once rather than one row's. A tile of classes is read as ``[X, BLOCK_CL]`` with
X = (ch, r, e) and class ``c = ch·BLOCK_CL + cl``, then viewed as
``[CH, BLOCK_R, BLOCK_E, BLOCK_CL]``: BLOCK_CL (<= 8) lanes read consecutive classes, and each
thread holds CH classes of one position, so the max and sums over classes are mostly adds in
registers with a few warp shuffles. When all C classes fit (up to 1024), they are read once:
the forward selects the target logit from the tile in registers, the backward's exponentials
serve both the normaliser and ``softmax`` (read once, write once); they are a power-of-two tile
plus a small tail tile where that pads less (C = 71: 64 + 8 class lanes, not 128). Larger C
goes in chunks with an online log-sum-exp (running max and rescaled sum), the backward reading
its chunks twice. In-tile offsets are int32 from an int64 program base, int64 only where the
launcher finds a tile could span 2^31 elements.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfast.backend import triton_interpreting
from mmfast.kernels._common import (LOG_2PI_HI, LOG_2PI_LO, acc_dtype, cdiv, element_budget,
                                    next_power_of_2, num_warps, split_float, torch_acc_dtype)
from mmfast.kernels._launch import fast_launch

BERNOULLI, NORMAL, LAPLACE = 0, 1, 2
_LOG_2PI_HI = tl.constexpr(LOG_2PI_HI)
_LOG_2PI_LO = tl.constexpr(LOG_2PI_LO)


@triton.jit
def _softplus(l):
    return tl.maximum(l, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(l)))


@triton.jit
def _sigmoid(l):
    # exp of a non-positive number only: no overflow for |l| up to the dtype's range.
    e = tl.exp(-tl.abs(l))
    return tl.where(l >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@fast_launch
@triton.jit
def _elementwise_forward_kernel(
    p_ptr, s_ptr, x_ptr, out_ptr,
    rows, B, N, min_hi, min_lo,
    stride_pk, stride_pb, stride_pn,
    stride_sk, stride_sb, stride_sn,
    stride_xb, stride_xn,
    FAMILY: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_R (k, b) rows, swept over the N event elements in BLOCK_N chunks."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid_r = offs_r < rows
    k = offs_r // B
    b = offs_r % B
    p_row = (k * stride_pk + b * stride_pb)[:, None]
    s_row = (k * stride_sk + b * stride_sb)[:, None]
    x_row = (b * stride_xb)[:, None]
    min_scale = tl.cast(min_hi, ACC) + tl.cast(min_lo, ACC)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        valid = valid_r[:, None] & (offs_n < N)[None, :]
        p = tl.load(p_ptr + p_row + offs_n[None, :] * stride_pn, mask=valid, other=0.0).to(ACC)
        x = tl.load(x_ptr + x_row + offs_n[None, :] * stride_xn, mask=valid, other=0.0).to(ACC)
        if FAMILY == 0:
            term = x * p - _softplus(p)
        else:
            log_scale = tl.load(s_ptr + s_row + offs_n[None, :] * stride_sn, mask=valid,
                                other=0.0).to(ACC)
            scale = min_scale + tl.exp(log_scale)
            if FAMILY == 1:
                r = (x - p) / scale
                term = -0.5 * r * r - tl.log(scale)
            else:
                term = -tl.abs(x - p) / scale - tl.log(2.0 * scale)
        acc += tl.where(valid, term, 0.0)
    total = tl.sum(acc, axis=1)
    if FAMILY == 1:
        # −N log(2π)/2 once per row, from float32 halves that are exact in float64.
        total -= 0.5 * N * (tl.full((BLOCK_R,), _LOG_2PI_HI, ACC) + _LOG_2PI_LO)
    tl.store(out_ptr + offs_r, total.to(out_ptr.dtype.element_ty), mask=valid_r)


@fast_launch
@triton.jit
def _elementwise_backward_kernel(
    g_ptr, p_ptr, s_ptr, x_ptr, dp_ptr, ds_ptr, dx_ptr,
    K, B, N, min_hi, min_lo,
    stride_gk, stride_gb,
    stride_pk, stride_pb, stride_pn,
    stride_sk, stride_sb, stride_sn,
    stride_xb, stride_xn,
    FAMILY: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    S_PER_K: tl.constexpr, S_PER_B: tl.constexpr,
):
    """One program: a [BLOCK_B, BLOCK_N] tile of (b, n), all K samples in order.

    ``ds_ptr`` is ``[Ks, B, N]`` when ``S_PER_B``, else ``[Ks, num_b_blocks, N]`` partial sums
    (Ks = K when ``S_PER_K``, else 1)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_b = offs_b < B
    valid = valid_b[:, None] & (offs_n < N)[None, :]
    x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_n[None, :] * stride_xn, mask=valid,
                other=0.0).to(ACC)
    min_scale = tl.cast(min_hi, ACC) + tl.cast(min_lo, ACC)
    # Gradients are contiguous: [K, B, N] for the parameters, [B, N] for x.
    tile = offs_b[:, None] * N + offs_n[None, :]
    valid_n = offs_n < N
    part = (pid_b if not S_PER_B else 0) * N + offs_n  # this program's partial row of ds
    dx = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)
    ds_sum = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)  # Σ_k ds, for a scale shared over k
    for k_step in range(0, K):
        k = tl.cast(k_step, tl.int64)
        g = tl.load(g_ptr + k * stride_gk + offs_b * stride_gb, mask=valid_b, other=0.0).to(ACC)
        g = g[:, None]
        p = tl.load(p_ptr + k * stride_pk + offs_b[:, None] * stride_pb
                    + offs_n[None, :] * stride_pn, mask=valid, other=0.0).to(ACC)
        out = k * B * N + tile
        if FAMILY == 0:
            dp = g * (x - _sigmoid(p))
            dx += g * p
        else:
            log_scale = tl.load(s_ptr + k * stride_sk + offs_b[:, None] * stride_sb
                                + offs_n[None, :] * stride_sn, mask=valid, other=0.0).to(ACC)
            raw = tl.exp(log_scale)
            scale = min_scale + raw
            if FAMILY == 1:
                r = (x - p) / scale
                dp = g * r / scale
                ds = g * (r * r - 1.0) * (raw / scale)
            else:
                diff = x - p
                sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
                dp = g * sign / scale
                ds = g * (tl.abs(diff) / scale - 1.0) * (raw / scale)
            dx -= dp
            ds = tl.where(valid, ds, 0.0)  # padding lanes must not enter the sums
            if S_PER_K:
                if S_PER_B:
                    tl.store(ds_ptr + out, ds.to(ds_ptr.dtype.element_ty), mask=valid)
                else:
                    tl.store(ds_ptr + k * tl.num_programs(0) * N + part,
                             tl.sum(ds, axis=0).to(ds_ptr.dtype.element_ty), mask=valid_n)
            else:
                ds_sum += ds
        tl.store(dp_ptr + out, dp.to(dp_ptr.dtype.element_ty), mask=valid)
    tl.store(dx_ptr + tile, dx.to(dx_ptr.dtype.element_ty), mask=valid)
    if FAMILY != 0 and not S_PER_K:
        if S_PER_B:
            tl.store(ds_ptr + tile, ds_sum.to(ds_ptr.dtype.element_ty), mask=valid)
        else:
            tl.store(ds_ptr + part, tl.sum(ds_sum, axis=0).to(ds_ptr.dtype.element_ty),
                     mask=valid_n)


@triton.jit
def _tile_coordinates(CH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_CL: tl.constexpr, INDEX: tl.constexpr):
    """Row b, position e (each ``[X, 1]``) and class c (``[X, BLOCK_CL]``, from 0) of a tile
    of ``CH·BLOCK_CL`` classes read as ``[X, BLOCK_CL]``, X = CH·BLOCK_R·BLOCK_E rows ordered
    (ch, r, e), c = ch·BLOCK_CL + cl.

    Read in two dimensions, the class lanes are the only contiguous axis, so every Triton
    version lays the load out alike: BLOCK_CL lanes along cl, the other lanes and the warps
    along positions (r, e), and each thread's CH classes of a position in registers. (A 4-d
    load ties three non-contiguous axes, and Triton 3.6 and 3.9 break the tie differently:
    3.6 put the lanes along ch, and the class reductions back on warp shuffles.)"""
    x = tl.arange(0, CH * BLOCK_R * BLOCK_E).to(INDEX)[:, None]
    c = x // (BLOCK_R * BLOCK_E) * BLOCK_CL + tl.arange(0, BLOCK_CL).to(INDEX)[None, :]
    return x // BLOCK_E % BLOCK_R, x % BLOCK_E, c


@triton.jit
def _read_classes(ptr, first, C, rows, positions, stride_r, stride_e, stride_c,
                  CH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_CL: tl.constexpr, INDEX: tl.constexpr):
    """Logits of classes ``first + [0, CH·BLOCK_CL)`` (``ptr`` at class ``first`` of the tile's
    first position) -> ``(l, c)``, each ``[CH, BLOCK_R, BLOCK_E, BLOCK_CL]``: the logits (−inf
    where masked, in their own dtype) and their class indices. Classes reduce over axes 0 and
    3, to ``[BLOCK_R, BLOCK_E]``; per-position values broadcast back as ``v[None, :, :, None]``."""
    r, e, c = _tile_coordinates(CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
    mask = (r < rows) & (e < positions) & (c < C - first)
    l = tl.load(ptr + (r * stride_r + e * stride_e) + c * stride_c, mask=mask,
                other=float("-inf"))
    # The rows are ordered (ch, r, e): a view of the same registers.
    return (tl.reshape(l, (CH, BLOCK_R, BLOCK_E, BLOCK_CL)),
            tl.reshape(first + c, (CH, BLOCK_R, BLOCK_E, BLOCK_CL)))


@triton.jit
def _write_classes(ptr, dl, first, C, rows, positions, stride_r, stride_e,
                   CH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_CL: tl.constexpr, INDEX: tl.constexpr):
    """Store ``dl [CH, BLOCK_R, BLOCK_E, BLOCK_CL]`` where :func:`_read_classes` read (unit
    class stride)."""
    r, e, c = _tile_coordinates(CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
    mask = (r < rows) & (e < positions) & (c < C - first)
    dl = tl.reshape(dl, (CH * BLOCK_R * BLOCK_E, BLOCK_CL))
    tl.store(ptr + (r * stride_r + e * stride_e) + c, dl.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _categorical_targets(t_ptr, b0, e0, r, e, valid, C, stride_tb, stride_te):
    """``[BLOCK_R, BLOCK_E]`` int32 class indices of the tile's positions: -1 for padding and for
    an index outside [0, C), so comparing them with class indices selects nothing there."""
    t = tl.load(t_ptr + b0 * stride_tb + e0 * stride_te + r[:, None] * stride_tb
                + e[None, :] * stride_te, mask=valid, other=-1)
    return tl.where((t >= 0) & (t < C), t, -1).to(tl.int32)


# Few nested @triton.jit helpers below: the interpreter pays about a millisecond a call.
@triton.jit
def _read_all_classes(l_pos, C, rows, positions, stride_lb, stride_le, stride_lc,
                      ACC: tl.constexpr, BLOCK_CH: tl.constexpr, TAIL_CH: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_CL: tl.constexpr,
                      INDEX: tl.constexpr):
    """All C classes of the tile's positions (the ONE_CHUNK case): logits and class indices of
    the main tile and, when TAIL_CH > 0, of the tail tile (else the main tile again, unused),
    their maximum ``[BLOCK_R, BLOCK_E]`` and the shift for the exponentials (broadcastable to
    a tile; 0 where every class is −inf, so that exp(−inf − 0) = 0 rather than NaN)."""
    l, c = _read_classes(l_pos, 0, C, rows, positions, stride_lb, stride_le, stride_lc,
                         BLOCK_CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
    l = l.to(ACC)
    top = tl.max(tl.max(l, axis=0), axis=2)
    l_tail, c_tail = l, c
    if TAIL_CH > 0:
        l_tail, c_tail = _read_classes(
            l_pos + BLOCK_CH * BLOCK_CL * stride_lc, BLOCK_CH * BLOCK_CL, C, rows, positions,
            stride_lb, stride_le, stride_lc, TAIL_CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
        l_tail = l_tail.to(ACC)
        top = tl.maximum(top, tl.max(tl.max(l_tail, axis=0), axis=2))
    shift = tl.where(top == float("-inf"), 0.0, top)[None, :, :, None]
    return l, c, l_tail, c_tail, top, shift


@triton.jit
def _online_logsumexp(top, total, l):
    """One chunk of an online log-sum-exp over classes: the running maximum ``top`` and the sum
    ``total`` of exp(l − top) ``[BLOCK_R, BLOCK_E]``, updated with the chunk's logits ``l``
    ``[CH, BLOCK_R, BLOCK_E, BLOCK_CL]`` (a maximum of −inf shifts by 0, never giving NaN)."""
    new_top = tl.maximum(top, tl.max(tl.max(l, axis=0), axis=2))
    shift = tl.where(new_top == float("-inf"), 0.0, new_top)
    total = (total * tl.exp(top - shift)
             + tl.sum(tl.sum(tl.exp(l - shift[None, :, :, None]), axis=0), axis=2))
    return new_top, total


@fast_launch
@triton.jit
def _categorical_forward_kernel(
    l_ptr, t_ptr, out_ptr, B, E, C, row_blocks,
    stride_lk, stride_lb, stride_le, stride_lc, stride_tb, stride_te,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_CH: tl.constexpr,
    TAIL_CH: tl.constexpr, BLOCK_CL: tl.constexpr, ONE_CHUNK: tl.constexpr,
    INDEX: tl.constexpr,
):
    """One program: BLOCK_R rows b of one sample k, positions in BLOCK_E chunks (one when
    E <= BLOCK_E), classes in tiles of ``[CH, BLOCK_R, BLOCK_E, BLOCK_CL]`` (see
    :func:`_tile_coordinates`), so the class reductions are mostly in-thread.

    ONE_CHUNK: all C classes at once, read once, the target logit selected from registers: a
    tile of BLOCK_CH·BLOCK_CL classes plus, when TAIL_CH > 0, a tail tile of TAIL_CH·BLOCK_CL
    (C = 71 reads 64 + 8 class lanes rather than 128). Otherwise chunks of BLOCK_CH·BLOCK_CL
    classes with an online log-sum-exp (running max and rescaled sum)."""
    BLOCK_C: tl.constexpr = BLOCK_CH * BLOCK_CL
    pid = tl.program_id(0)
    k = (pid // row_blocks).to(tl.int64)
    b0 = (pid % row_blocks).to(tl.int64) * BLOCK_R
    rows = tl.minimum(B - b0, BLOCK_R).to(tl.int32)
    r = tl.arange(0, BLOCK_R).to(INDEX)
    e = tl.arange(0, BLOCK_E).to(INDEX)
    l_rows = l_ptr + k * stride_lk + b0 * stride_lb
    acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=ACC)
    for e_start in range(0, E, BLOCK_E):
        e0 = tl.cast(e_start, tl.int64)
        positions = tl.minimum(E - e0, BLOCK_E).to(tl.int32)
        valid = (r < rows)[:, None] & (e < positions)[None, :]
        target = _categorical_targets(t_ptr, b0, e0, r, e, valid, C, stride_tb, stride_te)
        l_pos = l_rows + e0 * stride_le
        if ONE_CHUNK:
            l, c, l_tail, c_tail, top, shift = _read_all_classes(
                l_pos, C, rows, positions, stride_lb, stride_le, stride_lc, ACC, BLOCK_CH,
                TAIL_CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
            at_target = c == target[None, :, :, None]
            total = tl.sum(tl.sum(tl.exp(l - shift), axis=0), axis=2)
            picked = tl.sum(tl.sum(tl.where(at_target, l, 0.0), axis=0), axis=2)
            if TAIL_CH > 0:
                at_target = c_tail == target[None, :, :, None]
                total += tl.sum(tl.sum(tl.exp(l_tail - shift), axis=0), axis=2)
                picked += tl.sum(tl.sum(tl.where(at_target, l_tail, 0.0), axis=0), axis=2)
        else:
            top = tl.full((BLOCK_R, BLOCK_E), float("-inf"), ACC)
            total = tl.zeros((BLOCK_R, BLOCK_E), dtype=ACC)
            picked = tl.zeros((BLOCK_R, BLOCK_E), dtype=ACC)
            for c_start in range(0, C, BLOCK_C):
                l, c = _read_classes(l_pos + tl.cast(c_start, tl.int64) * stride_lc, c_start,
                                     C, rows, positions, stride_lb, stride_le, stride_lc,
                                     BLOCK_CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
                l = l.to(ACC)
                top, total = _online_logsumexp(top, total, l)
                at_target = c == target[None, :, :, None]
                picked += tl.sum(tl.sum(tl.where(at_target, l, 0.0), axis=0), axis=2)
        log_p = picked - top - tl.log(tl.where(valid, total, 1.0))
        # An out-of-range class index gives NaN rather than a silently wrong value.
        log_p = tl.where(target >= 0, log_p, float("nan"))
        acc += tl.where(valid, log_p, 0.0)
    tl.store(out_ptr + k * B + b0 + r, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty),
             mask=r < rows)


@fast_launch
@triton.jit
def _categorical_backward_kernel(
    g_ptr, l_ptr, t_ptr, dl_ptr, B, E, C, row_blocks, e_blocks,
    stride_gk, stride_gb,
    stride_lk, stride_lb, stride_le, stride_lc, stride_tb, stride_te,
    stride_dk, stride_db, stride_de,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_CH: tl.constexpr,
    TAIL_CH: tl.constexpr, BLOCK_CL: tl.constexpr, ONE_CHUNK: tl.constexpr,
    INDEX: tl.constexpr,
):
    """One program: BLOCK_R rows b and BLOCK_E positions of one sample k (tiles as in the
    forward), writing ``g (onehot − softmax)`` into the contiguous ``[K, B, E, C]`` gradient.
    ONE_CHUNK: the logits are read once and their exponentials serve both the normaliser and
    the gradient; otherwise a log-sum-exp pass over class chunks, then a gradient pass."""
    BLOCK_C: tl.constexpr = BLOCK_CH * BLOCK_CL
    pid = tl.program_id(0)
    e0 = (pid % e_blocks).to(tl.int64) * BLOCK_E
    rest = pid // e_blocks
    k = (rest // row_blocks).to(tl.int64)
    b0 = (rest % row_blocks).to(tl.int64) * BLOCK_R
    rows = tl.minimum(B - b0, BLOCK_R).to(tl.int32)
    positions = tl.minimum(E - e0, BLOCK_E).to(tl.int32)
    r = tl.arange(0, BLOCK_R).to(INDEX)
    e = tl.arange(0, BLOCK_E).to(INDEX)
    valid = (r < rows)[:, None] & (e < positions)[None, :]
    g = tl.load(g_ptr + k * stride_gk + b0 * stride_gb + r * stride_gb, mask=r < rows,
                other=0.0).to(ACC)[None, :, None, None]
    target = _categorical_targets(t_ptr, b0, e0, r, e, valid, C, stride_tb, stride_te)
    target = target[None, :, :, None]
    l_pos = l_ptr + k * stride_lk + b0 * stride_lb + e0 * stride_le
    dl_pos = dl_ptr + k * stride_dk + b0 * stride_db + e0 * stride_de
    if ONE_CHUNK:
        l, c, l_tail, c_tail, top, shift = _read_all_classes(
            l_pos, C, rows, positions, stride_lb, stride_le, stride_lc, ACC, BLOCK_CH, TAIL_CH,
            BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
        p = tl.exp(l - shift)
        total = tl.sum(tl.sum(p, axis=0), axis=2)
        if TAIL_CH > 0:
            p_tail = tl.exp(l_tail - shift)
            total += tl.sum(tl.sum(p_tail, axis=0), axis=2)
        # One division per position, softmax·g = p·(g / Σp); padding positions divide by 1.
        weight = g / tl.where(valid, total, 1.0)[None, :, :, None]
        _write_classes(dl_pos, tl.where(c == target, g, 0.0) - p * weight, 0, C, rows,
                       positions, stride_db, stride_de, BLOCK_CH, BLOCK_R, BLOCK_E, BLOCK_CL,
                       INDEX)
        if TAIL_CH > 0:
            dl_tail = tl.where(c_tail == target, g, 0.0) - p_tail * weight
            _write_classes(dl_pos + BLOCK_C, dl_tail, BLOCK_C, C, rows, positions, stride_db,
                           stride_de, TAIL_CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
    else:
        top = tl.full((BLOCK_R, BLOCK_E), float("-inf"), ACC)
        total = tl.zeros((BLOCK_R, BLOCK_E), dtype=ACC)
        for c_start in range(0, C, BLOCK_C):
            l, c = _read_classes(l_pos + tl.cast(c_start, tl.int64) * stride_lc, c_start, C,
                                 rows, positions, stride_lb, stride_le, stride_lc,
                                 BLOCK_CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
            l = l.to(ACC)
            top, total = _online_logsumexp(top, total, l)
        lse = (top + tl.log(tl.where(valid, total, 1.0)))[None, :, :, None]
        for c_start in range(0, C, BLOCK_C):
            l, c = _read_classes(l_pos + tl.cast(c_start, tl.int64) * stride_lc, c_start, C,
                                 rows, positions, stride_lb, stride_le, stride_lc,
                                 BLOCK_CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)
            dl = g * (tl.where(c == target, 1.0, 0.0) - tl.exp(l.to(ACC) - lse))
            _write_classes(dl_pos + tl.cast(c_start, tl.int64), dl, c_start, C, rows, positions,
                           stride_db, stride_de, BLOCK_CH, BLOCK_R, BLOCK_E, BLOCK_CL, INDEX)


# ------------------------------------------------------------------------------- launchers

def _flat(t: torch.Tensor, lead: int) -> torch.Tensor:
    """View ``[*lead_axes, *event]`` as ``[*lead_axes, N]`` (a copy only if strides forbid).
    N is computed, not inferred: ``reshape(..., -1)`` refuses a tensor with no elements."""
    return t.reshape(*t.shape[:lead], math.prod(t.shape[lead:]))


def _scale_view(log_scale: torch.Tensor | None, params: torch.Tensor):
    """``[Ks, Bs, *event]`` log-scale -> (``[Ks, Bs, N]`` view, its (k, b, n) strides with 0 on
    a broadcast axis). Without a scale (bernoulli), the parameters stand in, never read."""
    s = params if log_scale is None else log_scale
    s = _flat(s, 2)
    return s, (0 if s.shape[0] == 1 else s.stride(0), 0 if s.shape[1] == 1 else s.stride(1),
               s.stride(2))


def _forward_blocks(N: int) -> tuple[int, int]:
    budget = element_budget()
    block_n = min(next_power_of_2(max(N, 1)), budget, 2048)
    return max(1, budget // block_n), block_n


def _elementwise_forward(family: int, params: torch.Tensor, log_scale: torch.Tensor | None,
                         x: torch.Tensor, min_scale: float) -> torch.Tensor:
    K, B = params.shape[:2]
    out = torch.empty((K, B), dtype=torch_acc_dtype(params.dtype), device=params.device)
    p = _flat(params, 2)
    N = p.shape[2]
    if out.numel() == 0:
        return out
    if N == 0:
        return out.zero_()
    xs = _flat(x, 1)
    s, s_strides = _scale_view(log_scale, params)
    block_r, block_n = _forward_blocks(N)
    block_r = min(block_r, next_power_of_2(K * B))
    hi, lo = split_float(min_scale)
    grid = (cdiv(K * B, block_r),)
    _elementwise_forward_kernel[grid](
        p, s, xs, out, K * B, B, N, hi, lo,
        *p.stride(), *s_strides, *xs.stride(),
        FAMILY=family, ACC=acc_dtype(params.dtype), BLOCK_R=block_r, BLOCK_N=block_n,
        num_warps=num_warps(block_r * block_n))
    return out


def _elementwise_backward(family: int, grad: torch.Tensor | None, params: torch.Tensor,
                          log_scale: torch.Tensor | None, x: torch.Tensor, min_scale: float):
    """-> ``(dparams [K, B, *event], dlog_scale (log_scale's shape) or None, dx [B, *event])``."""
    K, B = params.shape[:2]
    dp = torch.empty_like(params, memory_format=torch.contiguous_format)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if grad is None or dp.numel() == 0:
        ds = None if log_scale is None else torch.zeros_like(log_scale)
        return dp.zero_(), ds, dx.zero_()
    p = _flat(params, 2)
    N = p.shape[2]
    xs = _flat(x, 1)
    s, s_strides = _scale_view(log_scale, params)
    budget = element_budget()
    block_n = min(next_power_of_2(N), budget, 1024 if triton_interpreting() else 512)
    block_b = min(next_power_of_2(B), max(1, budget // block_n))
    if not triton_interpreting():
        # Each program loops over K: keep ~2048 of them in flight rather than a few big tiles.
        block_b = min(block_b, max(1, next_power_of_2(B * cdiv(N, block_n)) // 2048))
    grid = (cdiv(B, block_b), cdiv(N, block_n))
    per_k, per_b = s.shape[0] == K, s.shape[1] == B
    if log_scale is None:
        ds = dp  # never written
    elif per_b:
        ds = torch.empty((s.shape[0], B, N), dtype=params.dtype, device=params.device)
    else:  # partial sums over each b-block, reduced below in a fixed order
        ds = torch.empty((s.shape[0], grid[0], N), dtype=torch_acc_dtype(params.dtype),
                         device=params.device)
    hi, lo = split_float(min_scale)
    _elementwise_backward_kernel[grid](
        grad, p, s, xs, dp, ds, dx,
        K, B, N, hi, lo, *grad.stride(), *p.stride(), *s_strides, *xs.stride(),
        FAMILY=family, ACC=acc_dtype(params.dtype), BLOCK_B=block_b, BLOCK_N=block_n,
        S_PER_K=per_k, S_PER_B=per_b, num_warps=num_warps(block_b * block_n))
    if log_scale is None:
        return dp, None, dx
    if not per_b:
        ds = ds.sum(1, keepdim=True).to(params.dtype)
    return dp, ds.reshape(log_scale.shape), dx


def bernoulli_log_prob_forward(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits ``[K, B, *event]``, x ``[B, *event]`` (any strides) -> ``[K, B]``."""
    return _elementwise_forward(BERNOULLI, logits, None, x, 0.0)


def bernoulli_log_prob_backward(grad: torch.Tensor | None, logits: torch.Tensor, x: torch.Tensor):
    """grad ``[K, B]`` -> ``(dlogits [K, B, *event], dx [B, *event])``, contiguous."""
    dp, _, dx = _elementwise_backward(BERNOULLI, grad, logits, None, x, 0.0)
    return dp, dx


def normal_log_prob_forward(loc: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor,
                            min_scale: float) -> torch.Tensor:
    """loc ``[K, B, *event]``, log_scale ``[Ks, Bs, *event]`` (Ks in {1, K}, Bs in {1, B}),
    x ``[B, *event]`` -> ``[K, B]``."""
    return _elementwise_forward(NORMAL, loc, log_scale, x, min_scale)


def normal_log_prob_backward(grad, loc, log_scale, x, min_scale):
    """-> ``(dloc, dlog_scale, dx)``: ``[K, B, *event]``, log_scale's ``[Ks, Bs, *event]``
    and ``[B, *event]``."""
    return _elementwise_backward(NORMAL, grad, loc, log_scale, x, min_scale)


def laplace_log_prob_forward(loc: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor,
                             min_scale: float) -> torch.Tensor:
    """As :func:`normal_log_prob_forward`, for the Laplace density."""
    return _elementwise_forward(LAPLACE, loc, log_scale, x, min_scale)


def laplace_log_prob_backward(grad, loc, log_scale, x, min_scale):
    """As :func:`normal_log_prob_backward`, for the Laplace density."""
    return _elementwise_backward(LAPLACE, grad, loc, log_scale, x, min_scale)


# Lanes along the fast class axis, at most: a warp's load covers 4 positions x 8 consecutive
# classes, and each thread holds at least 8 classes of a position (few classes: fewer lanes).
_CLASS_LANES = 8


def _categorical_blocks(B: int, E: int, C: int) -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_R, BLOCK_E, BLOCK_CH, TAIL_CH, BLOCK_CL, num_warps)``.

    Classes: up to 1024 in one chunk, ``BLOCK_CH·BLOCK_CL`` of them, or a power of two below C
    plus a tail of ``TAIL_CH·BLOCK_CL`` when that pads less (71 -> 64 + 8 rather than 128);
    more than 1024 in chunks. Then as many positions as fit the element budget, then as many
    rows b, so that a program moves several rows' logits at once; about 32 elements a thread
    (its share of a position's classes is reduced in registers, and the shuffles and set-up are
    paid over more elements)."""
    budget = element_budget()
    block_c = min(next_power_of_2(C), 1024, budget)
    block_cl = max(1, min(block_c // 8, _CLASS_LANES))
    main, tail = block_c, 0
    if C < block_c and block_c // 2 >= block_cl:
        tail = max(block_cl, next_power_of_2(C - block_c // 2))
        if block_c // 2 + tail < block_c:
            main = block_c // 2
        else:
            tail = 0
    # A position costs about as much as 8 class lanes whatever C (its target, normaliser and
    # masks): few classes must not mean thousands of positions a program.
    width = max(main + tail, 8)
    block_e = min(next_power_of_2(max(E, 1)), _floor_power_of_2(budget // width))
    block_r = min(next_power_of_2(B), _floor_power_of_2(budget // (block_e * width)))
    warps = min(8, _floor_power_of_2(block_r * block_e * width // 1024))
    return block_r, block_e, main // block_cl, tail // block_cl, block_cl, warps


def _floor_power_of_2(n: int) -> int:
    """The largest power of two ``<= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n.bit_length() - 1)


def _needs_wide_offsets(blocks: tuple[int, ...], *strides: tuple[int, ...]) -> bool:
    """Whether a tile's offsets from its program's base, Σ (block − 1)·stride per tensor, can
    pass int32 (each ``strides`` a tensor's strides along the tile's axes, as ``blocks``)."""
    return any(sum((n - 1) * abs(s) for n, s in zip(blocks, st)) >= 2 ** 31 for st in strides)


def _categorical_launch(B: int, E: int, C: int, *strides: tuple[int, ...]) -> dict:
    """Constexprs of both categorical kernels, from :func:`_categorical_blocks`."""
    block_r, block_e, block_ch, tail_ch, block_cl, warps = _categorical_blocks(B, E, C)
    lanes = (block_ch + tail_ch) * block_cl
    wide = _needs_wide_offsets((block_r, block_e, lanes), *strides)
    return dict(BLOCK_R=block_r, BLOCK_E=block_e, BLOCK_CH=block_ch, TAIL_CH=tail_ch,
                BLOCK_CL=block_cl, ONE_CHUNK=C <= lanes, INDEX=tl.int64 if wide else tl.int32,
                num_warps=warps)


def categorical_log_prob_forward(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits ``[K, B, *event, C]``, target int64 ``[B, *event]`` -> ``[K, B]``."""
    K, B, C = logits.shape[0], logits.shape[1], logits.shape[-1]
    out = torch.empty((K, B), dtype=torch_acc_dtype(logits.dtype), device=logits.device)
    E = math.prod(logits.shape[2:-1])  # not reshape(..., -1): ambiguous when K·B = 0
    if out.numel() == 0:
        return out
    if E == 0:
        return out.zero_()
    l = logits.reshape(K, B, E, C)
    t = target.reshape(B, E)
    launch = _categorical_launch(B, E, C, l.stride()[1:], t.stride())
    row_blocks = cdiv(B, launch["BLOCK_R"])
    _categorical_forward_kernel[(K * row_blocks,)](
        l, t, out, B, E, C, row_blocks, *l.stride(), *t.stride(),
        ACC=acc_dtype(logits.dtype), **launch)
    return out


def categorical_log_prob_backward(grad: torch.Tensor | None, logits: torch.Tensor,
                                  target: torch.Tensor) -> tuple[torch.Tensor]:
    """grad ``[K, B]`` -> ``(dlogits,)``: ``[K, B, *event, C]``, contiguous (a one-element
    tuple: one gradient per differentiable input)."""
    K, B, C = logits.shape[0], logits.shape[1], logits.shape[-1]
    dl = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if grad is None or dl.numel() == 0:
        return (dl.zero_(),)
    E = math.prod(logits.shape[2:-1])
    l = logits.reshape(K, B, E, C)
    t = target.reshape(B, E)
    d = dl.view(K, B, E, C)
    launch = _categorical_launch(B, E, C, l.stride()[1:], t.stride(), d.stride()[1:])
    row_blocks, e_blocks = cdiv(B, launch["BLOCK_R"]), cdiv(E, launch["BLOCK_E"])
    _categorical_backward_kernel[(K * row_blocks * e_blocks,)](
        grad, l, t, d, B, E, C, row_blocks, e_blocks, *grad.stride(), *l.stride(), *t.stride(),
        *d.stride()[:3], ACC=acc_dtype(logits.dtype), **launch)
    return (dl,)
