"""The latent terms of the masked and mixture objectives (METHOD.md), fused, forward and backward.

Subset part (``gaussian_subset_terms``), for rows r of ``[*batch]`` (``[B]`` or ``[B, S]``)
and samples k, with ``σ = exp(logvar/2)``:

    z_s[k, r]      = mu + σ ε
    log q(z_s|x_S) = −½ Σ_j (log 2π + logvar_j + ε_j²)            ((z − mu)²/σ² = ε² exactly)
    log p(z_s)     = −½ Σ_j (log 2π + z_j²)                          standard normal prior
                   = logsumexp_c [log π_c − ½ Σ_j (log 2π + λ_cj + (z_j − m_cj)² e^{−λ_cj})]
                                                                     mixture (π = softmax(logits),
                                                                     m = prior mu, λ = prior logvar)
Full part (``gaussian_full_terms``): ``z = mu_f + σ_f ε_f`` with ``log q(z|x)`` as above and
``log q(z|x_S) = −½ Σ_j (log 2π + logvar_s,j + (z_j − mu_s,j)² e^{−logvar_s,j})`` for every
subset s of the row (one full sample scored under each subset's posterior).

Backward. Write ``∂z`` for the total derivative reaching a sample through every output:

    ∂z = g_z − g_q ε/σ + g_p ∂log p/∂z,    ∂log p/∂z = −z  or  Σ_c ρ_c (m_c − z) e^{−λ_c}

(ρ the component responsibilities). Through ``z = mu + σ ε``: ``∂mu += ∂z``,
``∂logvar += ½ ∂z σ ε``, ``∂ε = ∂z σ``. Without stl, log q also keeps its parameter path:
``∂mu += g_q ε/σ`` and ``∂logvar += g_q (ε² − 1)/2``, which with the sample path's terms
of log q sum to exactly 0 and ``−g_q/2`` (taken so); with stl (the default) it does not.
The mixture parameters get ``∂logits_c = Σ g_p (ρ_c − π_c)``, ``∂m_cj = Σ g_p ρ_c (z_j − m_cj)
e^{−λ_cj}`` and ``∂λ_cj = Σ g_p ρ_c ((z_j − m_cj)² e^{−λ_cj} − 1)/2``. ``log q(z|x_S)`` is never
detached: ``∂mu_s += g (z − mu_s) e^{−logvar_s}``,
``∂logvar_s += g ((z − mu_s)² e^{−logvar_s} − 1)/2`` and its z-derivative ``−g (z − mu_s) e^{−logvar_s}`` joins ``∂z`` of the full sample.

Layout: a program owns a block of rows with the whole latent vector (d fits one tile) and loops
over the K samples, BLOCK_K at a time: its tile has BLOCK_K × BLOCK_R lanes, one (sample, row)
pair each. So the sums over K of the parameter gradients stay in registers (each lane sums its
samples; the lanes are summed before the store) and no ``[K, B, d]`` tensor is written besides
the samples (and ε's gradient), while BLOCK_K samples' loads are in flight at once. The
mixture works on ``[rows, components, d]`` tiles; each program leaves its partial prior
gradients in a small ``[programs, C, d]`` buffer that the launcher sums in a fixed order.
Everything is deterministic: no atomics anywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.kernels._common import (acc_dtype, cdiv, element_budget, next_power_of_2, num_warps,
                                    torch_acc_dtype)
from mmfast.kernels._gaussian_common import (_load_tile, _log_2pi_times, _logsumexp_rows,
                                             _mixture_weights)
from mmfast.kernels._launch import fast_launch
from mmfast.backend import triton_interpreting


@triton.jit
def _mixture_tiles(pl_ptr, pmu_ptr, plv_ptr, C, D, stride_pl, stride_pc, stride_pd,
                   stride_qc, stride_qd, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """The mixture prior in registers.

    Returns: m and e^{−λ} ``[BLOCK_C, BLOCK_D]`` (0 off the edges), log π ``[BLOCK_C]`` and
    π (0 past C), and ``const_c = log π_c − ½ Σ_j (log 2π + λ_cj)`` (−inf past C).
    """
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    valid_c = offs_c < C
    valid = valid_c[:, None] & (offs_d < D)[None, :]
    pmu = _load_tile(pmu_ptr, offs_c, offs_d, valid, stride_pc, stride_pd, ACC)
    plv = _load_tile(plv_ptr, offs_c, offs_d, valid, stride_qc, stride_qd, ACC)
    prec = tl.where(valid, tl.exp(-plv), 0.0)
    log_w, weight = _mixture_weights(pl_ptr, C, stride_pl, ACC, BLOCK_C)
    const = log_w - 0.5 * (_log_2pi_times(D, ACC) + tl.sum(plv, axis=1))
    const = tl.where(valid_c, const, float("-inf"))
    return pmu, prec, weight, const


@triton.jit
def _mixture_components(z, pmu, prec, const):
    """z ``[R, D]`` -> (diff ``[R, C, D]`` = z − m, component log-densities ``[R, C]``, their
    log-sum-exp ``[R]``)."""
    diff = z[:, None, :] - pmu[None, :, :]
    comp = const[None, :] - 0.5 * tl.sum(diff * diff * prec[None, :, :], axis=2)
    return diff, comp, _logsumexp_rows(comp)


@triton.jit
def _lanes(BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """A tile's lanes: BLOCK_K samples × BLOCK_R rows, flattened as ``k_lane · BLOCK_R + r``.
    Returns (k_lane, r) ``[BLOCK_K·BLOCK_R]``."""
    lane = tl.arange(0, BLOCK_K * BLOCK_R)
    return lane // BLOCK_R, lane % BLOCK_R


@triton.jit
def _sum_over_samples(x, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_K·BLOCK_R, BLOCK_D]`` lanes -> ``[BLOCK_R, BLOCK_D]``, summed over the sample
    lanes in a fixed order."""
    return tl.sum(tl.reshape(x, (BLOCK_K, BLOCK_R, BLOCK_D)), axis=0)


@triton.jit
def _sample_block(eps_ptr, k0, lane_k, offs_r, valid_r, offs_d, valid_d, K, stride_ek, stride_er,
                  stride_ed, ACC: tl.constexpr):
    """Samples ``k0 + lane_k`` of the lanes' rows: (offs_k and valid_k ``[lanes]``, valid_kd
    ``[lanes, BLOCK_D]``, ε ``[lanes, BLOCK_D]``, 0 past K and off the edges)."""
    offs_k = k0 + lane_k.to(tl.int64)
    valid_k = valid_r & (offs_k < K)
    valid_kd = valid_k[:, None] & valid_d[None, :]
    eps = _load_tile(eps_ptr + (offs_k * stride_ek)[:, None], offs_r, offs_d, valid_kd,
                     stride_er, stride_ed, ACC)
    return offs_k, valid_k, valid_kd, eps


@fast_launch
@triton.jit
def _subset_forward_kernel(
    mu_ptr, lv_ptr, eps_ptr, pl_ptr, pmu_ptr, plv_ptr, z_ptr, q_ptr, p_ptr,
    K, R, D, C, rows_per_program,
    stride_mr, stride_md, stride_vr, stride_vd, stride_ek, stride_er, stride_ed,
    stride_pl, stride_pc, stride_pd, stride_qc, stride_qd,
    MIXTURE: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program: rows_per_program rows, BLOCK_R at a time, the K samples BLOCK_K at a time."""
    first = tl.program_id(0).to(tl.int64) * rows_per_program
    lane_k, lane_r = _lanes(BLOCK_K, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < D
    log_2pi_d = _log_2pi_times(D, ACC)
    if MIXTURE:
        pmu, prec, weight, const = _mixture_tiles(pl_ptr, pmu_ptr, plv_ptr, C, D, stride_pl,
                                                  stride_pc, stride_pd, stride_qc, stride_qd,
                                                  ACC, BLOCK_C, BLOCK_D)
    for r0 in range(0, rows_per_program, BLOCK_R):
        offs_r = first + r0 + lane_r
        valid_r = (offs_r < R) & (r0 + lane_r < rows_per_program)
        valid = valid_r[:, None] & valid_d[None, :]
        # Every sample lane of a row loads the row's parameters (cache hits after the first).
        mu = _load_tile(mu_ptr, offs_r, offs_d, valid, stride_mr, stride_md, ACC)
        lv = _load_tile(lv_ptr, offs_r, offs_d, valid, stride_vr, stride_vd, ACC)
        sigma = tl.exp(0.5 * lv)
        q_const = log_2pi_d + tl.sum(lv, axis=1)
        for k0 in range(0, K, BLOCK_K):
            offs_k, valid_k, valid_kd, eps = _sample_block(
                eps_ptr, k0, lane_k, offs_r, valid_r, offs_d, valid_d, K, stride_ek,
                stride_er, stride_ed, ACC)
            z = mu + sigma * eps
            # Outputs are contiguous: z [K, R, D], log-densities [K, R].
            out_row = offs_k * R + offs_r
            tl.store(z_ptr + out_row[:, None] * D + offs_d[None, :],
                     z.to(z_ptr.dtype.element_ty), mask=valid_kd)
            log_q = -0.5 * (q_const + tl.sum(eps * eps, axis=1))
            if MIXTURE:
                _, _, log_p = _mixture_components(z, pmu, prec, const)
            else:
                log_p = -0.5 * (log_2pi_d + tl.sum(z * z, axis=1))
            tl.store(q_ptr + out_row, log_q.to(q_ptr.dtype.element_ty), mask=valid_k)
            tl.store(p_ptr + out_row, log_p.to(p_ptr.dtype.element_ty), mask=valid_k)


@triton.jit
def _through_sample(dmu, dlv, dz, dz_all, gq, sigma, eps, valid, Q_PARAMETERS: tl.constexpr):
    """``dmu``, ``dlv`` plus the gradients that reach a posterior's parameters through its
    sample ``z = mu + σ ε``: ``∂mu += ∂z``, ``∂logvar += ½ ∂z σ ε`` where ``valid``. ``dz_all``
    is the z-derivative with log q's term ``−g_q ε/σ``, ``dz`` without it. With Q_PARAMETERS
    (log q keeps its parameter path: stl off), log q's total derivative along the sample is
    exactly 0 for mu and −g_q/2 for logvar, taken as such: as the difference of its two paths'
    terms of size ε/σ (3e6 at logvar = −30) it lost float32 precision."""
    if Q_PARAMETERS:
        dmu += tl.where(valid, dz, 0.0)
        dlv += tl.where(valid, 0.5 * dz * sigma * eps - 0.5 * gq, 0.0)
    else:
        dmu += tl.where(valid, dz_all, 0.0)
        dlv += tl.where(valid, 0.5 * dz_all * sigma * eps, 0.0)
    return dmu, dlv


@fast_launch
@triton.jit
def _subset_backward_kernel(
    gz_ptr, gq_ptr, gp_ptr, mu_ptr, lv_ptr, eps_ptr, pl_ptr, pmu_ptr, plv_ptr,
    dmu_ptr, dlv_ptr, deps_ptr, dpl_part_ptr, dpmu_part_ptr, dplv_part_ptr,
    K, R, D, C, rows_per_program,
    stride_zk, stride_zr, stride_zd, stride_qk, stride_qr, stride_pk, stride_pr,
    stride_mr, stride_md, stride_vr, stride_vd, stride_ek, stride_er, stride_ed,
    stride_pl, stride_pc, stride_pd, stride_qc, stride_qd,
    HAS_GZ: tl.constexpr, HAS_GQ: tl.constexpr, HAS_GP: tl.constexpr, STL: tl.constexpr,
    MIXTURE: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program: rows_per_program rows, BLOCK_R at a time, the K samples BLOCK_K at a time (each
    sample lane sums its samples' parameter gradients; the lanes are summed at the end of the
    row block); with the mixture prior and an upstream gradient of log p it also writes its
    partial prior gradients (``[C]``, ``[C, D]``, ``[C, D]`` at slot ``pid``)."""
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    lane_k, lane_r = _lanes(BLOCK_K, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < D
    offs_c = tl.arange(0, BLOCK_C)
    if MIXTURE:
        pmu, prec, weight, const = _mixture_tiles(pl_ptr, pmu_ptr, plv_ptr, C, D, stride_pl,
                                                  stride_pc, stride_pd, stride_qc, stride_qd,
                                                  ACC, BLOCK_C, BLOCK_D)
        part_pmu = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
        part_plv = tl.zeros((BLOCK_C, BLOCK_D), dtype=ACC)
        part_pl = tl.zeros((BLOCK_C,), dtype=ACC)
    for r0 in range(0, rows_per_program, BLOCK_R):
        offs_r = first + r0 + lane_r
        valid_r = (offs_r < R) & (r0 + lane_r < rows_per_program)
        valid = valid_r[:, None] & valid_d[None, :]
        mu = _load_tile(mu_ptr, offs_r, offs_d, valid, stride_mr, stride_md, ACC)
        lv = _load_tile(lv_ptr, offs_r, offs_d, valid, stride_vr, stride_vd, ACC)
        sigma = tl.exp(0.5 * lv)
        dmu = tl.zeros((BLOCK_K * BLOCK_R, BLOCK_D), dtype=ACC)
        dlv = tl.zeros((BLOCK_K * BLOCK_R, BLOCK_D), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            offs_k, valid_k, valid_kd, eps = _sample_block(
                eps_ptr, k0, lane_k, offs_r, valid_r, offs_d, valid_d, K, stride_ek,
                stride_er, stride_ed, ACC)
            z = mu + sigma * eps
            dz = tl.zeros((BLOCK_K * BLOCK_R, BLOCK_D), dtype=ACC)
            if HAS_GZ:
                dz += _load_tile(gz_ptr + (offs_k * stride_zk)[:, None], offs_r, offs_d,
                                 valid_kd, stride_zr, stride_zd, ACC)
            if HAS_GQ:
                gq = tl.load(gq_ptr + offs_k * stride_qk + offs_r * stride_qr, mask=valid_k,
                             other=0.0).to(ACC)[:, None]
            if HAS_GP:
                gp = tl.load(gp_ptr + offs_k * stride_pk + offs_r * stride_pr, mask=valid_k,
                             other=0.0).to(ACC)
                if MIXTURE:
                    diff, comp, lse = _mixture_components(z, pmu, prec, const)
                    share = gp[:, None] * tl.exp(comp - lse[:, None])          # g_p ρ_c [R, C]
                    share = tl.where(valid_k[:, None], share, 0.0)
                    scaled = diff * prec[None, :, :]                           # (z − m) e^{−λ}
                    dz -= tl.sum(share[:, :, None] * scaled, axis=1)
                    part_pmu += tl.sum(share[:, :, None] * scaled, axis=0)
                    part_plv += tl.sum(share[:, :, None] * (0.5 * diff * scaled - 0.5), axis=0)
                    part_pl += tl.sum(share, axis=0) - weight * tl.sum(gp, axis=0)
                else:
                    dz -= gp[:, None] * z
            dz_all = dz - gq * eps / sigma if HAS_GQ else dz      # with log q's z-derivative
            tl.store(deps_ptr + (offs_k * R + offs_r)[:, None] * D + offs_d[None, :],
                     (dz_all * sigma).to(deps_ptr.dtype.element_ty), mask=valid_kd)
            # Lanes past K (or past the rows) add nothing, even where sigma overflowed.
            dmu, dlv = _through_sample(dmu, dlv, dz, dz_all, gq if HAS_GQ else dz, sigma, eps,
                                       valid_kd, HAS_GQ and not STL)
        offs_row = first + r0 + tl.arange(0, BLOCK_R)
        valid_row = (offs_row < R) & (r0 + tl.arange(0, BLOCK_R) < rows_per_program)
        keep = valid_row[:, None] & valid_d[None, :]
        tile = offs_row[:, None] * D + offs_d[None, :]
        tl.store(dmu_ptr + tile, _sum_over_samples(dmu, BLOCK_K, BLOCK_R, BLOCK_D)
                 .to(dmu_ptr.dtype.element_ty), mask=keep)
        tl.store(dlv_ptr + tile, _sum_over_samples(dlv, BLOCK_K, BLOCK_R, BLOCK_D)
                 .to(dlv_ptr.dtype.element_ty), mask=keep)
    if MIXTURE and HAS_GP:
        valid_c = offs_c < C
        part = pid * C * D + offs_c[:, None] * D + offs_d[None, :]
        keep = valid_c[:, None] & valid_d[None, :]
        tl.store(dpmu_part_ptr + part, part_pmu, mask=keep)
        tl.store(dplv_part_ptr + part, part_plv, mask=keep)
        tl.store(dpl_part_ptr + pid * C + offs_c, part_pl, mask=valid_c)


@triton.jit
def _load_subsets(mus_ptr, lvs_ptr, offs_b, offs_s, offs_d, valid3, stride_sb, stride_ss,
                  stride_sd, stride_tb, stride_ts, stride_td, ACC: tl.constexpr):
    """mu_s, logvar_s and e^{−logvar_s}, ``[BLOCK_B, BLOCK_S, BLOCK_D]`` (0 off the edges)."""
    bsd = offs_b[:, None, None] * stride_sb + offs_s[None, :, None] * stride_ss
    mu_s = tl.load(mus_ptr + bsd + offs_d[None, None, :] * stride_sd, mask=valid3,
                   other=0.0).to(ACC)
    bsd = offs_b[:, None, None] * stride_tb + offs_s[None, :, None] * stride_ts
    lv_s = tl.load(lvs_ptr + bsd + offs_d[None, None, :] * stride_td, mask=valid3,
                   other=0.0).to(ACC)
    return mu_s, lv_s, tl.where(valid3, tl.exp(-lv_s), 0.0)


@triton.jit
def _score_gradients(gqfs_ptr, offs_k, offs_b, offs_s, valid_k, valid_bs, valid_d, z, mu_s, prec_s,
                     stride_hk, stride_hb, stride_hs, ACC: tl.constexpr):
    """For log q(z|x_S) at the lanes' samples z ``[lanes, D]``, with its upstream gradient g
    ``[lanes, S]`` loaded here (0 past K and off the edges): its gradients with respect to mu_s
    and logvar_s ``[lanes, S, D]``, and its z-derivative summed over the subsets ``[lanes, D]``."""
    valid_ks = valid_k[:, None] & valid_bs
    g = tl.load(gqfs_ptr + offs_k[:, None] * stride_hk + offs_b[:, None] * stride_hb
                + offs_s[None, :] * stride_hs, mask=valid_ks, other=0.0).to(ACC)
    diff = z[:, None, :] - mu_s
    scaled = g[:, :, None] * diff * prec_s
    dlv = tl.where(valid_ks[:, :, None] & valid_d[None, None, :],
                   0.5 * diff * scaled - 0.5 * g[:, :, None], 0.0)
    return scaled, dlv, -tl.sum(scaled, axis=1)


@fast_launch
@triton.jit
def _full_forward_kernel(
    muf_ptr, lvf_ptr, eps_ptr, mus_ptr, lvs_ptr, z_ptr, qf_ptr, qfs_ptr,
    K, B, S, D,
    stride_fb, stride_fd, stride_gb, stride_gd, stride_ek, stride_eb, stride_ed,
    stride_sb, stride_ss, stride_sd, stride_tb, stride_ts, stride_td,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b block, s block), the K samples BLOCK_K at a time. The s block 0 also writes z
    and log q(z|x)."""
    lane_k, lane_b = _lanes(BLOCK_K, BLOCK_B)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + lane_b
    offs_s = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    writes_full = (tl.zeros((BLOCK_K * BLOCK_B,), dtype=tl.int32) + tl.program_id(1)) == 0
    offs_d = tl.arange(0, BLOCK_D)
    valid_b = offs_b < B
    valid_d = offs_d < D
    valid = valid_b[:, None] & valid_d[None, :]
    valid_bs = valid_b[:, None] & (offs_s < S)[None, :]
    valid3 = valid_bs[:, :, None] & valid_d[None, None, :]
    log_2pi_d = _log_2pi_times(D, ACC)
    mu_f = _load_tile(muf_ptr, offs_b, offs_d, valid, stride_fb, stride_fd, ACC)
    lv_f = _load_tile(lvf_ptr, offs_b, offs_d, valid, stride_gb, stride_gd, ACC)
    sigma_f = tl.exp(0.5 * lv_f)
    qf_const = log_2pi_d + tl.sum(lv_f, axis=1)
    mu_s, lv_s, prec_s = _load_subsets(mus_ptr, lvs_ptr, offs_b, offs_s, offs_d, valid3,
                                       stride_sb, stride_ss, stride_sd, stride_tb, stride_ts,
                                       stride_td, ACC)
    qfs_const = log_2pi_d + tl.sum(lv_s, axis=2)
    for k0 in range(0, K, BLOCK_K):
        offs_k, valid_k, valid_kd, eps = _sample_block(
            eps_ptr, k0, lane_k, offs_b, valid_b, offs_d, valid_d, K, stride_ek,
            stride_eb, stride_ed, ACC)
        z = mu_f + sigma_f * eps
        out_row = offs_k * B + offs_b
        tl.store(z_ptr + out_row[:, None] * D + offs_d[None, :], z.to(z_ptr.dtype.element_ty),
                 mask=valid_kd & writes_full[:, None])
        log_qf = -0.5 * (qf_const + tl.sum(eps * eps, axis=1))
        tl.store(qf_ptr + out_row, log_qf.to(qf_ptr.dtype.element_ty), mask=valid_k & writes_full)
        diff = z[:, None, :] - mu_s
        log_qfs = -0.5 * (qfs_const + tl.sum(diff * diff * prec_s, axis=2))
        tl.store(qfs_ptr + out_row[:, None] * S + offs_s[None, :],
                 log_qfs.to(qfs_ptr.dtype.element_ty), mask=valid_k[:, None] & valid_bs)


@triton.jit
def _store_subset_grads(dmus_ptr, dlvs_ptr, dmu_s, dlv_s, rows, valid_rows, offs_s, S, offs_d, D,
                        BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """Sum the lanes' ``[BLOCK_K·BLOCK_B, BLOCK_S, BLOCK_D]`` gradients over the sample lanes
    (fixed order) and store them at rows ``[BLOCK_B]`` of the contiguous ``[B, S, D]``
    gradients of mu_s and logvar_s."""
    tile = (rows[:, None, None] * S + offs_s[None, :, None]) * D + offs_d[None, None, :]
    keep = ((valid_rows[:, None] & (offs_s < S)[None, :])[:, :, None]
            & (offs_d < D)[None, None, :])
    dmu = tl.reshape(tl.sum(tl.reshape(dmu_s, (BLOCK_K, BLOCK_B * BLOCK_S, BLOCK_D)), axis=0),
                     (BLOCK_B, BLOCK_S, BLOCK_D))
    dlv = tl.reshape(tl.sum(tl.reshape(dlv_s, (BLOCK_K, BLOCK_B * BLOCK_S, BLOCK_D)), axis=0),
                     (BLOCK_B, BLOCK_S, BLOCK_D))
    tl.store(dmus_ptr + tile, dmu.to(dmus_ptr.dtype.element_ty), mask=keep)
    tl.store(dlvs_ptr + tile, dlv.to(dlvs_ptr.dtype.element_ty), mask=keep)


@fast_launch
@triton.jit
def _full_backward_kernel(
    gz_ptr, gqf_ptr, gqfs_ptr, muf_ptr, lvf_ptr, eps_ptr, mus_ptr, lvs_ptr,
    dmuf_ptr, dlvf_ptr, deps_ptr, dmus_ptr, dlvs_ptr, zsum_ptr,
    K, B, S, D,
    stride_zk, stride_zb, stride_zd, stride_qk, stride_qb, stride_hk, stride_hb, stride_hs,
    stride_fb, stride_fd, stride_gb, stride_gd, stride_ek, stride_eb, stride_ed,
    stride_sb, stride_ss, stride_sd, stride_tb, stride_ts, stride_td,
    HAS_GZ: tl.constexpr, HAS_GQF: tl.constexpr, HAS_GQFS: tl.constexpr, STL: tl.constexpr,
    ONE_CHUNK: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program: a block of rows b with all their subsets, the K samples BLOCK_K at a time (each
    sample lane sums its samples' gradients; the lanes are summed before the stores).

    When the subsets fit one tile (ONE_CHUNK, the usual case), a single sweep over K does
    everything. Otherwise phase 1 sweeps the subsets a tile at a time (K inner), summing the
    subset-parameter gradients over K in registers and collecting log q(z|x_S)'s z-derivative,
    summed over subsets, in ``zsum`` (``[K, B, D]`` in the accumulation dtype, this program's
    rows only: rounding a running sum to a 16-bit ε gradient after every chunk lost precision,
    and float16 partial sums overflowed); phase 2 turns the total z-derivative into the
    full-posterior gradients. Phase 2 reads zsum and writes ε's gradient, never an address it
    has read: with elements held by several threads, an overwrite could reach a thread that
    had yet to read it.
    """
    lane_k, lane_b = _lanes(BLOCK_K, BLOCK_B)
    first = tl.program_id(0).to(tl.int64) * BLOCK_B
    offs_b = first + lane_b
    offs_d = tl.arange(0, BLOCK_D)
    valid_b = offs_b < B
    valid_d = offs_d < D
    valid = valid_b[:, None] & valid_d[None, :]
    mu_f = _load_tile(muf_ptr, offs_b, offs_d, valid, stride_fb, stride_fd, ACC)
    lv_f = _load_tile(lvf_ptr, offs_b, offs_d, valid, stride_gb, stride_gd, ACC)
    sigma_f = tl.exp(0.5 * lv_f)
    # Stores of summed gradients address the block's rows once each, not once per lane.
    rows = first + tl.arange(0, BLOCK_B)
    valid_rows = rows < B
    # Gradients of mu_s / logvar_s are contiguous [B, S, D].
    if HAS_GQFS and not ONE_CHUNK:
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
            valid_bs = valid_b[:, None] & (offs_s < S)[None, :]
            valid3 = valid_bs[:, :, None] & valid_d[None, None, :]
            mu_s, _, prec_s = _load_subsets(mus_ptr, lvs_ptr, offs_b, offs_s, offs_d, valid3,
                                            stride_sb, stride_ss, stride_sd, stride_tb,
                                            stride_ts, stride_td, ACC)
            dmu_s = tl.zeros((BLOCK_K * BLOCK_B, BLOCK_S, BLOCK_D), dtype=ACC)
            dlv_s = tl.zeros((BLOCK_K * BLOCK_B, BLOCK_S, BLOCK_D), dtype=ACC)
            for k0 in range(0, K, BLOCK_K):
                offs_k, valid_k, valid_kd, eps = _sample_block(
                    eps_ptr, k0, lane_k, offs_b, valid_b, offs_d, valid_d, K, stride_ek,
                    stride_eb, stride_ed, ACC)
                d_mu, d_lv, d_z = _score_gradients(
                    gqfs_ptr, offs_k, offs_b, offs_s, valid_k, valid_bs, valid_d,
                    mu_f + sigma_f * eps, mu_s, prec_s, stride_hk, stride_hb, stride_hs, ACC)
                dmu_s += d_mu
                dlv_s += d_lv
                here = zsum_ptr + (offs_k * B + offs_b)[:, None] * D + offs_d[None, :]
                before = tl.load(here, mask=valid_kd & (s0 > 0), other=0.0)
                tl.store(here, before + d_z, mask=valid_kd)
            _store_subset_grads(dmus_ptr, dlvs_ptr, dmu_s, dlv_s, rows, valid_rows, offs_s, S,
                                offs_d, D, BLOCK_K, BLOCK_B, BLOCK_S, BLOCK_D)
        # Phase 2 reads zsum, which other threads of the program wrote.
        tl.debug_barrier()
    if HAS_GQFS and ONE_CHUNK:
        offs_s = tl.arange(0, BLOCK_S).to(tl.int64)
        valid_bs = valid_b[:, None] & (offs_s < S)[None, :]
        valid3 = valid_bs[:, :, None] & valid_d[None, None, :]
        mu_s, _, prec_s = _load_subsets(mus_ptr, lvs_ptr, offs_b, offs_s, offs_d, valid3,
                                        stride_sb, stride_ss, stride_sd, stride_tb, stride_ts,
                                        stride_td, ACC)
        dmu_s = tl.zeros((BLOCK_K * BLOCK_B, BLOCK_S, BLOCK_D), dtype=ACC)
        dlv_s = tl.zeros((BLOCK_K * BLOCK_B, BLOCK_S, BLOCK_D), dtype=ACC)
    dmu_f = tl.zeros((BLOCK_K * BLOCK_B, BLOCK_D), dtype=ACC)
    dlv_f = tl.zeros((BLOCK_K * BLOCK_B, BLOCK_D), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k, valid_k, valid_kd, eps = _sample_block(
            eps_ptr, k0, lane_k, offs_b, valid_b, offs_d, valid_d, K, stride_ek,
            stride_eb, stride_ed, ACC)
        tile_kb = (offs_k * B + offs_b)[:, None] * D + offs_d[None, :]
        dz = tl.zeros((BLOCK_K * BLOCK_B, BLOCK_D), dtype=ACC)
        if HAS_GQFS:
            if ONE_CHUNK:
                d_mu, d_lv, d_z = _score_gradients(
                    gqfs_ptr, offs_k, offs_b, offs_s, valid_k, valid_bs, valid_d,
                    mu_f + sigma_f * eps, mu_s, prec_s, stride_hk, stride_hb, stride_hs, ACC)
                dmu_s += d_mu
                dlv_s += d_lv
                dz += d_z
            else:
                dz += tl.load(zsum_ptr + tile_kb, mask=valid_kd, other=0.0)
        if HAS_GZ:
            dz += _load_tile(gz_ptr + (offs_k * stride_zk)[:, None], offs_b, offs_d, valid_kd,
                             stride_zb, stride_zd, ACC)
        if HAS_GQF:
            gq = tl.load(gqf_ptr + offs_k * stride_qk + offs_b * stride_qb, mask=valid_k,
                         other=0.0).to(ACC)[:, None]
        dz_all = dz - gq * eps / sigma_f if HAS_GQF else dz      # with log q's z-derivative
        tl.store(deps_ptr + tile_kb, (dz_all * sigma_f).to(deps_ptr.dtype.element_ty),
                 mask=valid_kd)
        # Lanes past K (or past B) add nothing, even where sigma overflowed.
        dmu_f, dlv_f = _through_sample(dmu_f, dlv_f, dz, dz_all, gq if HAS_GQF else dz, sigma_f,
                                       eps, valid_kd, HAS_GQF and not STL)
    keep = valid_rows[:, None] & valid_d[None, :]
    tile = rows[:, None] * D + offs_d[None, :]
    tl.store(dmuf_ptr + tile, _sum_over_samples(dmu_f, BLOCK_K, BLOCK_B, BLOCK_D)
             .to(dmuf_ptr.dtype.element_ty), mask=keep)
    tl.store(dlvf_ptr + tile, _sum_over_samples(dlv_f, BLOCK_K, BLOCK_B, BLOCK_D)
             .to(dlvf_ptr.dtype.element_ty), mask=keep)
    if HAS_GQFS and ONE_CHUNK:
        _store_subset_grads(dmus_ptr, dlvs_ptr, dmu_s, dlv_s, rows, valid_rows, offs_s, S,
                            offs_d, D, BLOCK_K, BLOCK_B, BLOCK_S, BLOCK_D)


# ------------------------------------------------------------------------------- launchers

# Samples a program works on at once (its sample lanes). The sums over K stay inside a program,
# deterministic with no partial buffers, so on the GPU the bytes in flight are rows × lanes:
# with one sample at a time only ~R·d·4 bytes are (0.3 MB at B = 4096, d = 20), too few to
# cover the memory latency; an H100 needs a few MB in flight.
MAX_BLOCK_K = 8


def _lane_blocks(K: int, rows: int, lanes: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_ROWS) for a tile of ``lanes`` (sample, row) pairs: samples first (up
    to MAX_BLOCK_K), then rows; on the GPU rows stay few enough to leave ~1024 programs."""
    block_k = min(next_power_of_2(max(K, 1)), max(1, lanes), MAX_BLOCK_K)
    block_rows = min(next_power_of_2(max(rows, 1)), max(1, lanes // block_k))
    if not triton_interpreting():
        block_rows = min(block_rows, max(1, next_power_of_2(rows) // 1024))
    return block_k, block_rows


def _subset_blocks(R: int, D: int, C: int, mixture: bool, K: int
                   ) -> tuple[int, int, int, int, int]:
    """BLOCK_K, BLOCK_R, BLOCK_D, BLOCK_C and rows per program.

    The tile holds whole latent vectors (and every mixture component) for BLOCK_K samples of
    BLOCK_R rows, within a register budget on the GPU (:func:`_lane_blocks`); the interpreter
    takes the largest tiles the budget allows (few programs).
    """
    budget = element_budget()
    block_d = next_power_of_2(max(D, 1))
    block_c = next_power_of_2(max(C, 1)) if mixture else 1
    block_k, block_r = _lane_blocks(K, R, budget // (block_d * block_c))
    blocks = cdiv(R, block_r)
    # The mixture leaves one [C, D] partial per program: bound the number of programs.
    programs = min(blocks, 64 if triton_interpreting() else 1024) if mixture else blocks
    return block_k, block_r, block_d, block_c, cdiv(blocks, programs) * block_r


def _rows(mu_s: torch.Tensor, eps_s: torch.Tensor):
    D = mu_s.shape[-1]
    return mu_s.reshape(-1, D), eps_s.reshape(eps_s.shape[0], -1, D)


def _prior_args(prior_logits, prior_mu, prior_logvar, like):
    if prior_logits is None:
        return like, like, like, 1, (0,), (0, 0), (0, 0)
    return (prior_logits, prior_mu, prior_logvar, prior_logits.shape[0], prior_logits.stride(),
            prior_mu.stride(), prior_logvar.stride())


def gaussian_subset_terms_forward(mu_s, logvar_s, eps_s, prior_logits, prior_mu, prior_logvar,
                                  stl: bool):
    """Implementation of ``mmfast::gaussian_subset_terms``.

    Args: mu_s, logvar_s ``[*batch, d]``; eps_s ``[K, *batch, d]``; the mixture prior
    (logits ``[C]``, mu/logvar ``[C, d]``) or three None; stl (no effect on values).
    Returns: contiguous ``(z_s [K, *batch, d], log_q_s [K, *batch], log_p_s [K, *batch])``.
    """
    K = eps_s.shape[0]
    acc = torch_acc_dtype(eps_s.dtype)
    z = torch.empty_like(eps_s, memory_format=torch.contiguous_format)
    log_q = torch.empty(eps_s.shape[:-1], dtype=acc, device=eps_s.device)
    log_p = torch.empty(eps_s.shape[:-1], dtype=acc, device=eps_s.device)
    mu, eps = _rows(mu_s, eps_s)
    lv = logvar_s.reshape(mu.shape)
    R, D = mu.shape
    if K * R == 0:
        return z, log_q, log_p
    mixture = prior_logits is not None
    pl, pmu, plv, C, spl, spm, spv = _prior_args(prior_logits, prior_mu, prior_logvar, mu)
    block_k, block_r, block_d, block_c, per_program = _subset_blocks(R, D, C, mixture, K)
    grid = (cdiv(R, per_program),)
    _subset_forward_kernel[grid](
        mu, lv, eps, pl, pmu, plv, z, log_q, log_p, K, R, D, C, per_program,
        *mu.stride(), *lv.stride(), *eps.stride(), *spl, *spm, *spv,
        MIXTURE=mixture, ACC=acc_dtype(eps_s.dtype),
        BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_C=block_c,
        num_warps=num_warps(block_k * block_r * block_d * block_c))
    return z, log_q, log_p


def _strides_or_zero(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def gaussian_subset_terms_backward(grad_z, grad_q, grad_p, mu_s, logvar_s, eps_s, prior_logits,
                                   prior_mu, prior_logvar, stl: bool):
    """Implementation of ``mmfast::gaussian_subset_terms_backward``.

    Args: upstream gradients of z_s ``[K, *batch, d]``, log_q_s and log_p_s ``[K, *batch]``
    (any may be None), then the forward's inputs.
    Returns: gradients of (mu_s, logvar_s, eps_s, prior_logits, prior_mu, prior_logvar), in the
    inputs' dtype, contiguous; empty tensors for an absent prior.
    """
    K = eps_s.shape[0]
    mixture = prior_logits is not None
    # The kernel writes every element of these (no memset launches when it runs).
    dmu = torch.empty_like(mu_s, memory_format=torch.contiguous_format)
    dlv = torch.empty_like(mu_s, memory_format=torch.contiguous_format)
    deps = torch.empty_like(eps_s, memory_format=torch.contiguous_format)
    if mixture:
        dpl, dpmu, dplv = (torch.zeros_like(t, memory_format=torch.contiguous_format)
                           for t in (prior_logits, prior_mu, prior_logvar))
    else:
        dpl, dpmu, dplv = (mu_s.new_empty(0) for _ in range(3))   # distinct: outputs may not alias
    mu, eps = _rows(mu_s, eps_s)
    lv = logvar_s.reshape(mu.shape)
    R, D = mu.shape
    if K * R == 0 or (grad_z is None and grad_q is None and grad_p is None):
        return dmu.zero_(), dlv.zero_(), deps.zero_(), dpl, dpmu, dplv
    gz = grad_z.reshape(eps.shape) if grad_z is not None else None
    gq = grad_q.reshape(K, R) if grad_q is not None else None
    gp = grad_p.reshape(K, R) if grad_p is not None else None
    pl, pmu, plv, C, spl, spm, spv = _prior_args(prior_logits, prior_mu, prior_logvar, mu)
    block_k, block_r, block_d, block_c, per_program = _subset_blocks(R, D, C, mixture, K)
    programs = cdiv(R, per_program)
    acc = torch_acc_dtype(mu_s.dtype)
    if mixture and gp is not None:
        part_pl = torch.empty((programs, C), dtype=acc, device=mu.device)
        part_pmu = torch.empty((programs, C, D), dtype=acc, device=mu.device)
        part_plv = torch.empty((programs, C, D), dtype=acc, device=mu.device)
    else:
        part_pl = part_pmu = part_plv = dmu
    _subset_backward_kernel[(programs,)](
        gz if gz is not None else eps, gq if gq is not None else eps,
        gp if gp is not None else eps, mu, lv, eps, pl, pmu, plv,
        dmu, dlv, deps, part_pl, part_pmu, part_plv,
        K, R, D, C, per_program,
        *_strides_or_zero(gz, 3), *_strides_or_zero(gq, 2), *_strides_or_zero(gp, 2),
        *mu.stride(), *lv.stride(), *eps.stride(), *spl, *spm, *spv,
        HAS_GZ=gz is not None, HAS_GQ=gq is not None, HAS_GP=gp is not None, STL=bool(stl),
        MIXTURE=mixture, ACC=acc_dtype(mu_s.dtype),
        BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_C=block_c,
        num_warps=num_warps(block_k * block_r * block_d * block_c))
    if mixture and gp is not None:
        # A fixed-order sum over the programs' partials: deterministic.
        dpl = part_pl.sum(0).to(prior_logits.dtype)
        dpmu = part_pmu.sum(0).to(prior_mu.dtype)
        dplv = part_plv.sum(0).to(prior_logvar.dtype)
    return dmu, dlv, deps, dpl, dpmu, dplv


def _subset_view(mu_s: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[B, d]`` or ``[B, S, d]`` as ``[B, S, d]`` (a view) and S."""
    view = mu_s.unsqueeze(1) if mu_s.dim() == 2 else mu_s
    return view, view.shape[1]


def _full_blocks(S: int, D: int, B: int, K: int) -> tuple[int, int, int, int]:
    """BLOCK_K, BLOCK_B, BLOCK_S, BLOCK_D: a tile of BLOCK_S subsets (all of them when they fit
    the budget) for BLOCK_K samples of BLOCK_B rows (:func:`_lane_blocks`)."""
    budget = element_budget()
    block_d = next_power_of_2(max(D, 1))
    block_s = min(next_power_of_2(max(S, 1)), max(1, budget // block_d))
    block_k, block_b = _lane_blocks(K, B, budget // (block_s * block_d))
    return block_k, block_b, block_s, block_d


def gaussian_full_terms_forward(mu_f, logvar_f, eps_f, mu_s, logvar_s, stl: bool):
    """Implementation of ``mmfast::gaussian_full_terms``.

    Args: mu_f, logvar_f ``[B, d]``; eps_f ``[K, B, d]``; mu_s, logvar_s ``[B, d]`` or
    ``[B, S, d]``; stl (no effect on values).
    Returns: contiguous ``(z [K, B, d], log_q_f [K, B], log_q_fs [K, B] or [K, B, S])``.
    """
    K, B, D = eps_f.shape
    acc = torch_acc_dtype(eps_f.dtype)
    z = torch.empty_like(eps_f, memory_format=torch.contiguous_format)
    log_qf = torch.empty((K, B), dtype=acc, device=eps_f.device)
    log_qfs = torch.empty((K, *mu_s.shape[:-1]), dtype=acc, device=eps_f.device)
    mus, S = _subset_view(mu_s)
    lvs, _ = _subset_view(logvar_s)
    if K * B == 0:
        return z, log_qf, log_qfs
    block_k, block_b, block_s, block_d = _full_blocks(S, D, B, K)
    grid = (cdiv(B, block_b), max(1, cdiv(S, block_s)))
    _full_forward_kernel[grid](
        mu_f, logvar_f, eps_f, mus, lvs, z, log_qf, log_qfs, K, B, S, D,
        *mu_f.stride(), *logvar_f.stride(), *eps_f.stride(), *mus.stride(), *lvs.stride(),
        ACC=acc_dtype(eps_f.dtype), BLOCK_K=block_k, BLOCK_B=block_b, BLOCK_S=block_s,
        BLOCK_D=block_d, num_warps=num_warps(block_k * block_b * block_s * block_d))
    return z, log_qf, log_qfs


def gaussian_full_terms_backward(grad_z, grad_qf, grad_qfs, mu_f, logvar_f, eps_f, mu_s,
                                 logvar_s, stl: bool):
    """Implementation of ``mmfast::gaussian_full_terms_backward``.

    Returns: gradients of (mu_f, logvar_f, eps_f, mu_s, logvar_s), contiguous, in the inputs'
    dtype.
    """
    K, B, D = eps_f.shape
    # The kernel writes every element of these, and of the subset gradients when grad_qfs
    # reaches it (no memset launches when it runs).
    dmuf = torch.empty_like(mu_f, memory_format=torch.contiguous_format)
    dlvf = torch.empty_like(mu_f, memory_format=torch.contiguous_format)
    deps = torch.empty_like(eps_f, memory_format=torch.contiguous_format)
    dmus = torch.empty_like(mu_s, memory_format=torch.contiguous_format)
    dlvs = torch.empty_like(mu_s, memory_format=torch.contiguous_format)
    if K * B == 0 or (grad_z is None and grad_qf is None and grad_qfs is None):
        return dmuf.zero_(), dlvf.zero_(), deps.zero_(), dmus.zero_(), dlvs.zero_()
    if grad_qfs is None:
        dmus.zero_()
        dlvs.zero_()
    mus, S = _subset_view(mu_s)
    lvs, _ = _subset_view(logvar_s)
    gqfs = grad_qfs.reshape(K, B, S) if grad_qfs is not None else None
    block_k, block_b, block_s, block_d = _full_blocks(S, D, B, K)
    one_chunk = S <= block_s
    # The wide-bank path's running sum over subset chunks, in the accumulation dtype.
    zsum = (eps_f.new_empty((K, B, D), dtype=torch_acc_dtype(eps_f.dtype))
            if gqfs is not None and not one_chunk else dmuf)
    _full_backward_kernel[(cdiv(B, block_b),)](
        grad_z if grad_z is not None else eps_f, grad_qf if grad_qf is not None else eps_f,
        gqfs if gqfs is not None else eps_f, mu_f, logvar_f, eps_f, mus, lvs,
        dmuf, dlvf, deps, dmus, dlvs, zsum, K, B, S, D,
        *_strides_or_zero(grad_z, 3), *_strides_or_zero(grad_qf, 2), *_strides_or_zero(gqfs, 3),
        *mu_f.stride(), *logvar_f.stride(), *eps_f.stride(), *mus.stride(), *lvs.stride(),
        HAS_GZ=grad_z is not None, HAS_GQF=grad_qf is not None, HAS_GQFS=gqfs is not None,
        STL=bool(stl), ONE_CHUNK=one_chunk, ACC=acc_dtype(eps_f.dtype),
        BLOCK_K=block_k, BLOCK_B=block_b, BLOCK_S=block_s, BLOCK_D=block_d,
        num_warps=num_warps(block_k * block_b * block_s * block_d))
    return dmuf, dlvf, deps, dmus, dlvs
