"""Latent log-densities: a diagonal Gaussian and a diagonal Gaussian mixture, forward and backward.

``gaussian_log_prob``: z ``[K, *batch, d]`` against mu, logvar that broadcast against ``z[k]``,
with ``t = (z − mu) e^{−logvar}``:

    out[k, r] = −½ Σ_j (log 2π + logvar_j + (z_j − mu_j)² e^{−logvar_j})
    ∂z  = −g t,    ∂mu = g t,    ∂logvar = ½ g (t (z − mu) − 1)

each summed over every axis along which that operand is broadcast (over k for mu and logvar,
always). ``mixture_log_prob``: z ``[K, *batch, d]``, logits ``[C]``, m, λ ``[C, d]``, with
π = softmax(logits), ``ℓ_c = log π_c − ½ Σ_j (log 2π + λ_cj + (z_j − m_cj)² e^{−λ_cj})`` and the
responsibilities ``ρ_c = exp(ℓ_c − out)``:

    out = logsumexp_c ℓ_c
    ∂z = −g Σ_c ρ_c (z − m_c) e^{−λ_c},   ∂logits_c = Σ g (ρ_c − π_c),
    ∂m_c = Σ g ρ_c (z − m_c) e^{−λ_c},     ∂λ_c = Σ g ρ_c ((z − m_c)² e^{−λ_c} − 1) / 2

(sums over the samples and rows). Log-sum-exps are shifted by their maximum, so component
log-densities of −1e4 and below (logvar down to −30, far-away samples) stay finite.

Layout. Broadcast operands arrive with their own shapes (size 1 on a broadcast axis), never
expanded. The launcher groups the batch axes into at most two canonical axes ``[P, Q]`` (adjacent
axes merge when every operand is broadcast alike along them and its strides allow a view), so
every kernel reads ``[K, P, Q, d]`` and ``[P, Q, d]`` operands through strides (0 along a
broadcast axis); only a batch that needs three or more groups is expanded and copied first.
A Gaussian program owns a ``[BLOCK_P, BLOCK_Q, BLOCK_D]`` tile and loops over the K samples:
mu and logvar are loaded once, their gradients are summed over k in registers, and the gradient
of an operand broadcast along P or Q is summed over the tile's axis and left as one partial per
block, which the launcher adds in a fixed order. A mixture program owns blocks of (k, p, q) rows
with every component (``[BLOCK_R, BLOCK_C, BLOCK_D]`` tiles); the backward's second grid axis
splits d, each program recomputing the component log-densities over the whole of d first, and
each leaves its partial prior gradients in a ``[programs, C, d]`` buffer summed in a fixed order.
No atomics anywhere: the backward is deterministic. Accumulation is float32 (float64 for float64
inputs); log-densities are stored in that dtype, gradients in each input's dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mmfast.backend import triton_interpreting
from mmfast.kernels._common import (acc_dtype, cdiv, element_budget, next_power_of_2, num_warps,
                                    torch_acc_dtype)
from mmfast.kernels._gaussian_common import (_load_tile, _log_2pi_times, _logsumexp_rows,
                                             _mixture_weights)
from mmfast.kernels._launch import fast_launch


@triton.jit
def _load_3d(ptr, offs_p, offs_q, offs_d, valid, stride_p, stride_q, stride_d, ACC: tl.constexpr):
    """``[BLOCK_P, BLOCK_Q, BLOCK_D]`` tile by strides, in ACC (0 where not ``valid``)."""
    offs = (offs_p[:, None, None] * stride_p + offs_q[None, :, None] * stride_q
            + offs_d[None, None, :] * stride_d)
    return tl.load(ptr + offs, mask=valid, other=0.0).to(ACC)


@triton.jit
def _store_grad(ptr, value, k, K, offs_p, offs_q, offs_d, valid_p, valid_q, valid_d,
                pid_p, pid_q, blocks_q, size_p, size_q, D,
                RED_P: tl.constexpr, RED_Q: tl.constexpr):
    """Store a ``[BLOCK_P, BLOCK_Q, BLOCK_D]`` gradient tile of sample k into the contiguous
    ``[parts, K, size_p, size_q, D]`` buffer of an operand. Along an axis where the operand is
    broadcast (RED_*), the tile is summed over that axis and lands in this block's own partial
    slot; otherwise parts is 1 there and the tile is stored as is."""
    part_p = 0
    part_q = 0
    parts_q = 1
    rows_p = offs_p
    ok_p = valid_p
    rows_q = offs_q
    ok_q = valid_q
    if RED_P:
        value = tl.sum(value, axis=0, keep_dims=True)
        rows_p = tl.zeros((1,), dtype=tl.int64)
        ok_p = rows_p == 0
        part_p = pid_p
    if RED_Q:
        value = tl.sum(value, axis=1, keep_dims=True)
        rows_q = tl.zeros((1,), dtype=tl.int64)
        ok_q = rows_q == 0
        part_q = pid_q
        parts_q = blocks_q
    slot = (part_p * parts_q + part_q) * K + k
    offs = (((slot * size_p + rows_p[:, None, None]) * size_q + rows_q[None, :, None]) * D
            + offs_d[None, None, :])
    keep = ok_p[:, None, None] & ok_q[None, :, None] & valid_d[None, None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=keep)


@fast_launch
@triton.jit
def _gaussian_forward_kernel(
    z_ptr, mu_ptr, lv_ptr, out_ptr, K, P, Q, D, blocks_q,
    stride_zk, stride_zp, stride_zq, stride_zd,
    stride_mp, stride_mq, stride_md, stride_vp, stride_vq, stride_vd,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D: tl.constexpr,
):
    """Program: a (p, q) block, every k. With ONE_D (d fits the tile) mu, e^{−logvar} and
    Σ logvar are loaded once; otherwise each sample sweeps d in chunks."""
    pid = tl.program_id(0).to(tl.int64)
    offs_p = (pid // blocks_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (pid % blocks_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid_pq = (offs_p < P)[:, None] & (offs_q < Q)[None, :]
    log_2pi_d = _log_2pi_times(D, ACC)
    if ONE_D:
        offs_d = tl.arange(0, BLOCK_D)
        valid = valid_pq[:, :, None] & (offs_d < D)[None, None, :]
        mu = _load_3d(mu_ptr, offs_p, offs_q, offs_d, valid, stride_mp, stride_mq, stride_md, ACC)
        lv = _load_3d(lv_ptr, offs_p, offs_q, offs_d, valid, stride_vp, stride_vq, stride_vd, ACC)
        prec = tl.exp(-lv)
        const = log_2pi_d + tl.sum(lv, axis=2)
    out_rows = offs_p[:, None] * Q + offs_q[None, :]   # the output is contiguous [K, P, Q]
    for k_step in range(0, K):
        k = tl.cast(k_step, tl.int64)
        if ONE_D:
            z = _load_3d(z_ptr + k * stride_zk, offs_p, offs_q, offs_d, valid, stride_zp,
                         stride_zq, stride_zd, ACC)
            diff = z - mu
            total = const + tl.sum(diff * diff * prec, axis=2)
        else:
            acc = tl.zeros((BLOCK_P, BLOCK_Q, BLOCK_D), dtype=ACC)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                valid = valid_pq[:, :, None] & (offs_d < D)[None, None, :]
                z = _load_3d(z_ptr + k * stride_zk, offs_p, offs_q, offs_d, valid, stride_zp,
                             stride_zq, stride_zd, ACC)
                mu = _load_3d(mu_ptr, offs_p, offs_q, offs_d, valid, stride_mp, stride_mq,
                              stride_md, ACC)
                lv = _load_3d(lv_ptr, offs_p, offs_q, offs_d, valid, stride_vp, stride_vq,
                              stride_vd, ACC)
                diff = z - mu
                acc += lv + diff * diff * tl.exp(-lv)    # padding: lv = diff = 0 adds 0
            total = log_2pi_d + tl.sum(acc, axis=2)
        tl.store(out_ptr + k * P * Q + out_rows, (-0.5 * total).to(out_ptr.dtype.element_ty),
                 mask=valid_pq)


@fast_launch
@triton.jit
def _gaussian_backward_kernel(
    g_ptr, z_ptr, mu_ptr, lv_ptr, dz_ptr, dmu_ptr, dlv_ptr, K, P, Q, D, blocks_q,
    stride_gk, stride_gp, stride_gq, stride_zk, stride_zp, stride_zq, stride_zd,
    stride_mp, stride_mq, stride_md, stride_vp, stride_vq, stride_vd,
    size_zp, size_zq, size_mp, size_mq, size_vp, size_vq,
    Z_RED_P: tl.constexpr, Z_RED_Q: tl.constexpr, M_RED_P: tl.constexpr,
    M_RED_Q: tl.constexpr, V_RED_P: tl.constexpr, V_RED_Q: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program: a (p, q) block (axis 0) and a d block (axis 1), every k in order."""
    pid = tl.program_id(0).to(tl.int64)
    pid_p = pid // blocks_q
    pid_q = pid % blocks_q
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_p = offs_p < P
    valid_q = offs_q < Q
    valid_d = offs_d < D
    valid_pq = valid_p[:, None] & valid_q[None, :]
    valid = valid_pq[:, :, None] & valid_d[None, None, :]
    mu = _load_3d(mu_ptr, offs_p, offs_q, offs_d, valid, stride_mp, stride_mq, stride_md, ACC)
    lv = _load_3d(lv_ptr, offs_p, offs_q, offs_d, valid, stride_vp, stride_vq, stride_vd, ACC)
    prec = tl.exp(-lv)
    dmu = tl.zeros((BLOCK_P, BLOCK_Q, BLOCK_D), dtype=ACC)
    dlv = tl.zeros((BLOCK_P, BLOCK_Q, BLOCK_D), dtype=ACC)
    for k_step in range(0, K):
        k = tl.cast(k_step, tl.int64)
        g_rows = offs_p[:, None] * stride_gp + offs_q[None, :] * stride_gq
        g = tl.load(g_ptr + k * stride_gk + g_rows, mask=valid_pq, other=0.0).to(ACC)[:, :, None]
        z = _load_3d(z_ptr + k * stride_zk, offs_p, offs_q, offs_d, valid, stride_zp, stride_zq,
                     stride_zd, ACC)
        diff = z - mu
        t = g * diff * prec                       # 0 off the edges: g or diff is 0 there
        dmu += t
        dlv += tl.where(valid, 0.5 * (t * diff - g), 0.0)
        _store_grad(dz_ptr, -t, k, K, offs_p, offs_q, offs_d, valid_p, valid_q, valid_d,
                    pid_p, pid_q, blocks_q, size_zp, size_zq, D, Z_RED_P, Z_RED_Q)
    _store_grad(dmu_ptr, dmu, 0, 1, offs_p, offs_q, offs_d, valid_p, valid_q, valid_d,
                pid_p, pid_q, blocks_q, size_mp, size_mq, D, M_RED_P, M_RED_Q)
    _store_grad(dlv_ptr, dlv, 0, 1, offs_p, offs_q, offs_d, valid_p, valid_q, valid_d,
                pid_p, pid_q, blocks_q, size_vp, size_vq, D, V_RED_P, V_RED_Q)


@triton.jit
def _row_offsets(offs_r, PQ, Q, stride_k, stride_p, stride_q):
    """Flat (k, p, q) row indices -> element offsets of the rows' starts."""
    k = offs_r // PQ
    rest = offs_r - k * PQ
    p = rest // Q
    return k * stride_k + p * stride_p + (rest - p * Q) * stride_q


@triton.jit
def _mixture_constants(pl_ptr, plv_ptr, C, D, stride_pl, stride_vc, stride_vd,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """-> (π ``[BLOCK_C]``, ``const_c = log π_c − ½ (d log 2π + Σ_j λ_cj)``, −inf past C)."""
    log_w, weight = _mixture_weights(pl_ptr, C, stride_pl, ACC, BLOCK_C)
    offs_c = tl.arange(0, BLOCK_C)
    valid_c = offs_c < C
    sum_lv = tl.zeros((BLOCK_C,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        valid = valid_c[:, None] & (offs_d < D)[None, :]
        sum_lv += tl.sum(_load_tile(plv_ptr, offs_c, offs_d, valid, stride_vc, stride_vd, ACC),
                         axis=1)
    return weight, log_w - 0.5 * (_log_2pi_times(D, ACC) + sum_lv)


@triton.jit
def _prior_tiles(pmu_ptr, plv_ptr, offs_d, C, D, stride_mc, stride_md, stride_vc, stride_vd,
                 ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Component means m and precisions e^{−λ} at the columns offs_d, ``[BLOCK_C, BLOCK_D]``
    (0 off the edges)."""
    offs_c = tl.arange(0, BLOCK_C)
    valid = (offs_c < C)[:, None] & (offs_d < D)[None, :]
    pmu = _load_tile(pmu_ptr, offs_c, offs_d, valid, stride_mc, stride_md, ACC)
    plv = _load_tile(plv_ptr, offs_c, offs_d, valid, stride_vc, stride_vd, ACC)
    return pmu, tl.where(valid, tl.exp(-plv), 0.0)


@triton.jit
def _component_log_densities(z_ptr, z_rows, valid_r, pmu_ptr, plv_ptr, pmu, prec, const, C, D,
                             stride_zd, stride_mc, stride_md, stride_vc, stride_vd,
                             ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_D: tl.constexpr, ONE_D: tl.constexpr):
    """ℓ ``[BLOCK_R, BLOCK_C]`` of a block of rows (−inf past C). With ONE_D the prior tiles
    ``pmu``/``prec`` cover d; otherwise they are reloaded chunk by chunk."""
    quad = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        valid = valid_r[:, None] & (offs_d < D)[None, :]
        z = tl.load(z_ptr + z_rows[:, None] + offs_d[None, :] * stride_zd, mask=valid,
                    other=0.0).to(ACC)
        if not ONE_D:
            pmu, prec = _prior_tiles(pmu_ptr, plv_ptr, offs_d, C, D, stride_mc, stride_md,
                                     stride_vc, stride_vd, ACC, BLOCK_C)
        diff = z[:, None, :] - pmu[None, :, :]
        quad += tl.sum(diff * diff * prec[None, :, :], axis=2)
    return const[None, :] - 0.5 * quad


@fast_launch
@triton.jit
def _mixture_forward_kernel(
    z_ptr, pl_ptr, pmu_ptr, plv_ptr, out_ptr, R, PQ, Q, D, C, rows_per_program,
    stride_zk, stride_zp, stride_zq, stride_zd, stride_pl, stride_mc, stride_md,
    stride_vc, stride_vd,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D: tl.constexpr,
):
    """Program: rows_per_program flat (k, p, q) rows, BLOCK_R at a time."""
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    _, const = _mixture_constants(pl_ptr, plv_ptr, C, D, stride_pl, stride_vc, stride_vd, ACC,
                                  BLOCK_C, BLOCK_D)
    pmu, prec = _prior_tiles(pmu_ptr, plv_ptr, tl.arange(0, BLOCK_D), C, D, stride_mc, stride_md,
                             stride_vc, stride_vd, ACC, BLOCK_C)
    for r0 in range(0, rows_per_program, BLOCK_R):
        offs_r = first + r0 + tl.arange(0, BLOCK_R)
        valid_r = (offs_r < R) & (r0 + tl.arange(0, BLOCK_R) < rows_per_program)
        z_rows = _row_offsets(offs_r, PQ, Q, stride_zk, stride_zp, stride_zq)
        comp = _component_log_densities(z_ptr, z_rows, valid_r, pmu_ptr, plv_ptr, pmu, prec,
                                        const, C, D, stride_zd, stride_mc, stride_md, stride_vc,
                                        stride_vd, ACC, BLOCK_R, BLOCK_C, BLOCK_D, ONE_D)
        tl.store(out_ptr + offs_r, _logsumexp_rows(comp).to(out_ptr.dtype.element_ty),
                 mask=valid_r)


@fast_launch
@triton.jit
def _mixture_backward_kernel(
    g_ptr, z_ptr, pl_ptr, pmu_ptr, plv_ptr, dz_ptr, dpl_part_ptr, dpmu_part_ptr, dplv_part_ptr,
    R, PQ, Q, D, C, rows_per_program,
    stride_gk, stride_gp, stride_gq, stride_zk, stride_zp, stride_zq, stride_zd,
    stride_pl, stride_mc, stride_md, stride_vc, stride_vd,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D: tl.constexpr,
):
    """Program: rows_per_program rows (axis 0) and the d block of axis 1. It writes ∂z of its
    rows on its columns and its partial prior gradients at slot ``program_id(0)`` (∂logits from
    the d block 0 only)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    first = pid * rows_per_program
    offs_c = tl.arange(0, BLOCK_C)
    valid_c = offs_c < C
    offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_d = offs_d < D
    weight, const = _mixture_constants(pl_ptr, plv_ptr, C, D, stride_pl, stride_vc, stride_vd,
                                       ACC, BLOCK_C, BLOCK_D)
    # With ONE_D these tiles serve both passes; otherwise the first pass reloads its chunks.
    pmu, prec = _prior_tiles(pmu_ptr, plv_ptr, offs_d, C, D, stride_mc, stride_md, stride_vc,
                             stride_vd, ACC, BLOCK_C)
    part_pmu = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
    part_plv = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
    part_pl = tl.zeros((BLOCK_C,), dtype=ACC)
    for r0 in range(0, rows_per_program, BLOCK_R):
        offs_r = first + r0 + tl.arange(0, BLOCK_R)
        valid_r = (offs_r < R) & (r0 + tl.arange(0, BLOCK_R) < rows_per_program)
        z_rows = _row_offsets(offs_r, PQ, Q, stride_zk, stride_zp, stride_zq)
        g = tl.load(g_ptr + _row_offsets(offs_r, PQ, Q, stride_gk, stride_gp, stride_gq),
                    mask=valid_r, other=0.0).to(ACC)
        comp = _component_log_densities(z_ptr, z_rows, valid_r, pmu_ptr, plv_ptr, pmu, prec,
                                        const, C, D, stride_zd, stride_mc, stride_md, stride_vc,
                                        stride_vd, ACC, BLOCK_R, BLOCK_C, BLOCK_D, ONE_D)
        share = g[:, None] * tl.exp(comp - _logsumexp_rows(comp)[:, None])      # g ρ_c [R, C]
        valid = valid_r[:, None] & valid_d[None, :]
        z = tl.load(z_ptr + z_rows[:, None] + offs_d[None, :] * stride_zd, mask=valid,
                    other=0.0).to(ACC)
        diff = z[:, None, :] - pmu[None, :, :]
        weighted = share[:, :, None] * diff * prec[None, :, :]     # g ρ_c (z − m_c) e^{−λ_c}
        # ∂z is contiguous [K, P, Q, d]: row r starts at r·d.
        tl.store(dz_ptr + offs_r[:, None] * D + offs_d[None, :],
                 (-tl.sum(weighted, axis=1)).to(dz_ptr.dtype.element_ty), mask=valid)
        part_pmu += tl.sum(weighted, axis=0)
        part_plv += tl.sum(0.5 * (weighted * diff - share[:, :, None]), axis=0)
        part_pl += tl.sum(share, axis=0) - weight * tl.sum(g, axis=0)
    keep = valid_c[:, None] & valid_d[None, :]
    part = pid * C * D + offs_c[:, None] * D + offs_d[None, :]
    tl.store(dpmu_part_ptr + part, part_pmu, mask=keep)
    tl.store(dplv_part_ptr + part, part_plv, mask=keep)
    first_d = (tl.zeros((BLOCK_C,), dtype=tl.int32) + pid_d) == 0
    tl.store(dpl_part_ptr + pid * C + offs_c, part_pl, mask=valid_c & first_d)


# ------------------------------------------------------------------------------- launchers

class _Operand(NamedTuple):
    """One tensor on the canonical ``[P, Q]`` batch: its sizes (1 where broadcast) and strides
    (0 where broadcast) along P and Q."""
    size_p: int
    size_q: int
    stride_p: int
    stride_q: int


def _batch_axes(t: torch.Tensor, lead: int, trail: int, n: int) -> tuple[list[int], list[int]]:
    """Sizes and strides of t's batch axes (between ``lead`` leading and ``trail`` trailing
    axes), left-padded with size-1 axes to ``n``."""
    sizes = list(t.shape[lead:t.dim() - trail])
    strides = list(t.stride()[lead:t.dim() - trail])
    pad = n - len(sizes)
    return [1] * pad + sizes, [0] * pad + strides


def _canonical(batch: tuple[int, ...], axes: list[tuple[list[int], list[int]]]):
    """Group the batch axes into ``(P, Q)`` and one :class:`_Operand` per entry of ``axes``, or
    None when that takes more than two groups.

    Size-1 batch axes drop out. Adjacent axes merge when every operand is broadcast alike along
    both and, where it is not broadcast, its outer stride is its inner stride times the inner
    size (so the merged axis is a plain strided axis of the operand: no copy).
    """
    groups: list[list[int]] = []
    patterns: list[tuple[bool, ...]] = []
    for i, size in enumerate(batch):
        if size == 1:
            continue
        pattern = tuple(sizes[i] != 1 for sizes, _ in axes)
        if groups and patterns[-1] == pattern:
            last = groups[-1][-1]
            if all(not full or strides[last] == strides[i] * sizes[i]
                   for (sizes, strides), full in zip(axes, pattern)):
                groups[-1].append(i)
                continue
        groups.append([i])
        patterns.append(pattern)
    if len(groups) > 2:
        return None
    groups = [[]] * (2 - len(groups)) + groups
    operands = []
    for sizes, strides in axes:
        dims = []
        for group in groups:
            size = math.prod(sizes[i] for i in group)
            dims.append((size, strides[group[-1]] if size != 1 else 0))
        operands.append(_Operand(dims[0][0], dims[1][0], dims[0][1], dims[1][1]))
    P, Q = (math.prod(batch[i] for i in group) for group in groups)
    return P, Q, operands


def _gaussian_canonical(z, mu, logvar, grad=None):
    """``(P, Q, [z, mu, logvar(, grad)] as _Operand)`` or None (see :func:`_canonical`)."""
    batch = tuple(torch.broadcast_shapes(z.shape[1:-1], mu.shape[:-1], logvar.shape[:-1]))
    n = len(batch)
    axes = [_batch_axes(z, 1, 1, n), _batch_axes(mu, 0, 1, n), _batch_axes(logvar, 0, 1, n)]
    if grad is not None:
        axes.append(_batch_axes(grad, 1, 0, n))
    return _canonical(batch, axes)


def _expanded(z, mu, logvar):
    """The operands expanded to the full batch and made contiguous: the rare fallback for a
    batch whose broadcast pattern needs more than two canonical axes."""
    batch = torch.broadcast_shapes(z.shape[1:-1], mu.shape[:-1], logvar.shape[:-1])
    d = z.shape[-1]
    z = z.reshape(z.shape[0], *(1,) * (len(batch) + 2 - z.dim()), *z.shape[1:])
    return (z.expand(z.shape[0], *batch, d).contiguous(), mu.expand(*batch, d).contiguous(),
            logvar.expand(*batch, d).contiguous())


def _pq_blocks(P: int, Q: int, block_d: int) -> tuple[int, int]:
    """BLOCK_P, BLOCK_Q for a tile of BLOCK_D columns: as many rows as the element budget
    allows (Q first); on the GPU at most ~1/1024 of the rows, so that enough programs loop
    over K side by side."""
    budget = element_budget()
    block_q = min(next_power_of_2(Q), max(1, budget // block_d))
    block_p = min(next_power_of_2(P), max(1, budget // (block_q * block_d)))
    if not triton_interpreting():
        rows = max(1, next_power_of_2(P * Q) // 1024)
        block_p = min(block_p, max(1, rows // block_q))
        block_q = min(block_q, rows)
    return block_p, block_q


def gaussian_log_prob_forward(z: torch.Tensor, mu: torch.Tensor,
                              logvar: torch.Tensor) -> torch.Tensor:
    """Implementation of ``mmfast::gaussian_log_prob``.

    Args: z ``[K, *zbatch, d]``; mu, logvar ``[*mbatch, d]`` with zbatch and mbatch
    broadcastable (any strides, stride 0 included).
    Returns: contiguous ``[K, *broadcast(zbatch, mbatch)]``, float32 (float64 for float64 z).
    """
    K, D = z.shape[0], z.shape[-1]
    batch = torch.broadcast_shapes(z.shape[1:-1], mu.shape[:-1], logvar.shape[:-1])
    out = torch.empty((K, *batch), dtype=torch_acc_dtype(z.dtype), device=z.device)
    if out.numel() == 0:
        return out
    if D == 0:
        return out.zero_()
    layout = _gaussian_canonical(z, mu, logvar)
    if layout is None:
        return gaussian_log_prob_forward(*_expanded(z, mu, logvar))
    P, Q, (lz, lm, lv) = layout
    block_d = min(next_power_of_2(D), element_budget())
    block_p, block_q = _pq_blocks(P, Q, block_d)
    blocks_q = cdiv(Q, block_q)
    _gaussian_forward_kernel[(cdiv(P, block_p) * blocks_q,)](
        z, mu, logvar, out, K, P, Q, D, blocks_q,
        z.stride(0), lz.stride_p, lz.stride_q, z.stride(-1),
        lm.stride_p, lm.stride_q, mu.stride(-1), lv.stride_p, lv.stride_q, logvar.stride(-1),
        ACC=acc_dtype(z.dtype), BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_D=block_d,
        ONE_D=block_d >= D, num_warps=num_warps(block_p * block_q * block_d))
    return out


def _grad_buffer(like: torch.Tensor, parts: int, acc: torch.dtype) -> torch.Tensor:
    """The kernel's output for one gradient: the gradient itself (contiguous, like's dtype), or
    ``[parts, *like.shape]`` partial sums in the accumulation dtype."""
    if parts == 1:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    return torch.empty((parts, *like.shape), dtype=acc, device=like.device)


def _reduce_parts(buffer: torch.Tensor, like: torch.Tensor, parts: int) -> torch.Tensor:
    # A fixed-order sum over the blocks' partials: deterministic.
    return buffer if parts == 1 else buffer.sum(0).to(like.dtype)


def gaussian_log_prob_backward(grad, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
    """Implementation of ``mmfast::gaussian_log_prob_backward``.

    Args: grad ``[K, *batch]`` (any strides) or None, then the forward's inputs.
    Returns: ``(dz, dmu, dlogvar)``, contiguous, each of its input's shape and dtype (summed
    over the axes along which that input is broadcast).
    """
    K, D = z.shape[0], z.shape[-1]
    if grad is None or grad.numel() == 0 or D == 0:
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format)
                     for t in (z, mu, logvar))
    layout = _gaussian_canonical(z, mu, logvar, grad)
    if layout is None:
        grad = grad.contiguous()
        layout = _gaussian_canonical(z, mu, logvar, grad)
    if layout is None:
        full = _expanded(z, mu, logvar)
        grads = gaussian_log_prob_backward(grad, *full)
        return tuple(g.sum_to_size(t.shape).contiguous() for g, t in zip(grads, (z, mu, logvar)))
    P, Q, (lz, lm, lv, lg) = layout
    budget = element_budget()
    block_d = min(next_power_of_2(D), budget, 1024 if triton_interpreting() else 128)
    block_p, block_q = _pq_blocks(P, Q, block_d)
    blocks_p, blocks_q = cdiv(P, block_p), cdiv(Q, block_q)
    acc = torch_acc_dtype(z.dtype)
    buffers, flags, parts = [], {}, []
    for name, t, op in (("Z", z, lz), ("M", mu, lm), ("V", logvar, lv)):
        red_p, red_q = op.size_p == 1 and P > 1, op.size_q == 1 and Q > 1
        flags[f"{name}_RED_P"], flags[f"{name}_RED_Q"] = red_p, red_q
        parts.append((blocks_p if red_p else 1) * (blocks_q if red_q else 1))
        buffers.append(_grad_buffer(t, parts[-1], acc))
    dz, dmu, dlv = buffers
    _gaussian_backward_kernel[(blocks_p * blocks_q, cdiv(D, block_d))](
        grad, z, mu, logvar, dz, dmu, dlv, K, P, Q, D, blocks_q,
        grad.stride(0), lg.stride_p, lg.stride_q,
        z.stride(0), lz.stride_p, lz.stride_q, z.stride(-1),
        lm.stride_p, lm.stride_q, mu.stride(-1), lv.stride_p, lv.stride_q, logvar.stride(-1),
        lz.size_p, lz.size_q, lm.size_p, lm.size_q, lv.size_p, lv.size_q, **flags,
        ACC=acc_dtype(z.dtype), BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_D=block_d,
        num_warps=num_warps(block_p * block_q * block_d))
    return tuple(_reduce_parts(b, t, n) for b, t, n in zip(buffers, (z, mu, logvar), parts))


def _mixture_rows(z: torch.Tensor, grad=None):
    """z (and grad) on the canonical batch: ``(z, grad, P, Q, z operand, grad operand)``, z
    reshaped (a copy only if its strides need it) when its batch needs three groups."""
    n = z.dim() - 2
    axes = [_batch_axes(z, 1, 1, n)] + ([] if grad is None else [_batch_axes(grad, 1, 0, n)])
    layout = _canonical(tuple(z.shape[1:-1]), axes)
    if layout is None:
        z = z.reshape(z.shape[0], -1, z.shape[-1])
        grad = None if grad is None else grad.reshape(grad.shape[0], -1)
        return _mixture_rows(z, grad)
    P, Q, operands = layout
    return z, grad, P, Q, operands[0], operands[1] if grad is not None else None


def _mixture_blocks(R: int, D: int, C: int) -> tuple[int, int, int, int]:
    """BLOCK_R, BLOCK_C, BLOCK_D and rows per program. Every component sits in the tile and d
    in as few chunks as the budget allows; the programs (each leaving one ``[C, d]`` partial in
    the backward) are bounded: 64 under the interpreter, 1024 on the GPU."""
    budget = element_budget()
    block_c = next_power_of_2(C)
    block_d = min(next_power_of_2(max(D, 1)), max(1, budget // block_c))
    block_r = min(next_power_of_2(R), max(1, budget // (block_c * block_d)))
    if not triton_interpreting():
        block_r = min(block_r, max(1, next_power_of_2(R) // 1024))
    blocks = cdiv(R, block_r)
    programs = min(blocks, 64 if triton_interpreting() else 1024)
    return block_r, block_c, block_d, cdiv(blocks, programs) * block_r


def mixture_log_prob_forward(z: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor,
                             logvar: torch.Tensor) -> torch.Tensor:
    """Implementation of ``mmfast::mixture_log_prob``.

    Args: z ``[K, *batch, d]`` (any strides); logits ``[C]``; mu, logvar ``[C, d]``.
    Returns: contiguous ``[K, *batch]``, float32 (float64 for float64 z).
    """
    out = torch.empty(z.shape[:-1], dtype=torch_acc_dtype(z.dtype), device=z.device)
    if out.numel() == 0:
        return out
    if logits.shape[0] == 0:
        return out.fill_(float("-inf"))    # an empty mixture: the log of an empty sum
    zc, _, P, Q, lz, _ = _mixture_rows(z)
    K, D, C = z.shape[0], z.shape[-1], logits.shape[0]
    R = K * P * Q
    block_r, block_c, block_d, per_program = _mixture_blocks(R, D, C)
    _mixture_forward_kernel[(cdiv(R, per_program),)](
        zc, logits, mu, logvar, out, R, P * Q, Q, D, C, per_program,
        zc.stride(0), lz.stride_p, lz.stride_q, zc.stride(-1), logits.stride(0),
        *mu.stride(), *logvar.stride(),
        ACC=acc_dtype(z.dtype), BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d,
        ONE_D=block_d >= D, num_warps=num_warps(block_r * block_c * block_d))
    return out


def mixture_log_prob_backward(grad, z: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor,
                              logvar: torch.Tensor):
    """Implementation of ``mmfast::mixture_log_prob_backward``.

    Args: grad ``[K, *batch]`` (any strides) or None, then the forward's inputs.
    Returns: ``(dz, dlogits, dmu, dlogvar)``, contiguous, in the inputs' shapes and dtypes.
    """
    zeros = [torch.zeros_like(t, memory_format=torch.contiguous_format)
             for t in (z, logits, mu, logvar)]
    # Without latent dimensions every responsibility equals its weight: ∂logits = g (π − π) = 0.
    if grad is None or grad.numel() == 0 or z.shape[-1] == 0 or logits.shape[0] == 0:
        return tuple(zeros)
    zc, gc, P, Q, lz, lg = _mixture_rows(z, grad)
    K, D, C = z.shape[0], z.shape[-1], logits.shape[0]
    R = K * P * Q
    block_r, block_c, block_d, per_program = _mixture_blocks(R, D, C)
    programs = cdiv(R, per_program)
    acc = torch_acc_dtype(z.dtype)
    dz = zeros[0]
    part_pl = torch.empty((programs, C), dtype=acc, device=z.device)
    part_pmu = torch.empty((programs, C, D), dtype=acc, device=z.device)
    part_plv = torch.empty((programs, C, D), dtype=acc, device=z.device)
    _mixture_backward_kernel[(programs, cdiv(D, block_d))](
        gc, zc, logits, mu, logvar, dz, part_pl, part_pmu, part_plv,
        R, P * Q, Q, D, C, per_program,
        gc.stride(0), lg.stride_p, lg.stride_q, zc.stride(0), lz.stride_p, lz.stride_q,
        zc.stride(-1), logits.stride(0), *mu.stride(), *logvar.stride(),
        ACC=acc_dtype(z.dtype), BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d,
        ONE_D=block_d >= D, num_warps=num_warps(block_r * block_c * block_d))
    # A fixed-order sum over the programs' partials: deterministic.
    return (dz, part_pl.sum(0).to(logits.dtype), part_pmu.sum(0).to(mu.dtype),
            part_plv.sum(0).to(logvar.dtype))
