"""Gaussian product of experts over modality subsets, forward and backward.

For a subset S with experts j (the modalities in S, plus the prior expert p when there is one),
log-precisions ``l_j = -logvar_j`` and precisions ``λ_j = exp(l_j)``:

    Λ = Σ_j λ_j,   w_j = λ_j / Λ,   out_mu = Σ_j w_j mu_j,   out_logvar = -log Λ.

Both are computed with a log-sum-exp: ``c = max_j l_j``, ``e_j = exp(l_j - c) ≤ 1``,
``T = Σ_j e_j``, ``log Λ = c + log T``, ``w_j = e_j / T``, which stays finite for logvar in
[-30, 30] (and far beyond) in float32. An empty product (no member, no prior) gives mu = 0,
logvar = 0; a NaN parameter gives NaN in the subsets that hold it and nowhere else.

Two paths, chosen per program (one batch row, a block of features, some subsets):

- Shared shift (the usual case): when, in every feature, the log-precisions of all the experts
  the program holds lie within ``SHARED_SHIFT_RANGE`` of their maximum ``c``, one shift serves
  every subset (the weights are ratios, whatever the shift, and no ``e_j`` comes near
  underflow). The ``M·d`` exps are computed once instead of once per subset, and a subset
  costs selections and sums over its members: ``S·M·d`` exps become ``M·d`` (forward and
  backward), plus one exp and one log per subset and feature for ``log Λ`` in the forward,
  taken relative to the subset's own maximum so that it is as precise as with a per-subset
  shift.
- Per-subset shift: otherwise, each subset is shifted by its own maximum, as above.

Backward. With upstream gradients ``gμ = ∂L/∂out_mu`` and ``gv = ∂L/∂out_logvar`` of subset S:

    ∂out_mu/∂mu_j      = w_j
    ∂out_mu/∂logvar_j  = ∂out_mu/∂λ_j · ∂λ_j/∂logvar_j = (mu_j - out_mu)/Λ · (-λ_j)
                       = -w_j (mu_j - out_mu)
    ∂out_logvar/∂logvar_j = -(1/Λ) · (-λ_j) = w_j

so ``dmu_j += w_j gμ`` and ``dlogvar_j += w_j (gv - gμ (mu_j - out_mu))``, summed over every
subset that holds j (the prior is in all of them). The backward recomputes w_j and out_mu in
the accumulation dtype from the inputs rather than trusting outputs rounded to float16/bfloat16.
On the shared-shift path ``w_j = e_j / T_S`` with ``e_j`` the same for every subset, so it
factors out of the sums: ``dmu_j = e_j A_j`` and ``dlogvar_j = e_j (B_j - mu_j A_j)`` with
``A_j = Σ_{S∋j} gμ_S / T_S`` and ``B_j = Σ_{S∋j} (gv_S + gμ_S out_mu_S) / T_S``; means are
taken relative to a centre of the row's experts, so that ``B_j - mu_j A_j`` cancels no more
digits than ``mu_j - out_mu`` would.

Layout: a program owns one batch row and a block of the d latent features. It loads the
``[M, BLOCK_D]`` tiles of mu and logvar once (only rows of modalities in at least one of its
subsets: a missing modality's values are never read) and sweeps its subsets in chunks of
CHUNK_S. On the GPU, when rows alone would leave SMs idle, the forward splits the subsets of a
row over several programs, and so does the backward: each of its parts writes partial sums to
its own slab of a float32 workspace, and the slabs are added afterwards by one reduction. Every
sum is over a fixed order (deterministic, no atomics). Every tensor is read by strides: a
stride-0 bank and a stride-0 prior (the N(0, I) expert, or a ``[d]`` prior expanded to
``[B, d]``) are never materialised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.backend import triton_interpreting
from mmfast.kernels._common import acc_dtype, cdiv, next_power_of_2
from mmfast.kernels._launch import fast_launch
from mmfast.kernels._masks import load_members, mask_layout, mask_row, members_used


@triton.jit
def _load_rows(ptr, row, offs_m, offs_d, needed, valid_d, stride_b, stride_m, stride_d,
               ACC_DTYPE: tl.constexpr):
    """``[BLOCK_M, BLOCK_D]`` tile of an expert parameter; rows not ``needed`` are not read."""
    ptrs = (ptr + row * stride_b + offs_m.to(tl.int64)[:, None] * stride_m
            + offs_d.to(tl.int64)[None, :] * stride_d)
    return tl.load(ptrs, mask=needed[:, None] & valid_d[None, :], other=0.0).to(ACC_DTYPE)


@triton.jit
def _load_prior(pmu_ptr, plv_ptr, row, offs_d, valid_d, stride_pb, stride_pd, stride_qb,
                stride_qd, HAS_PRIOR: tl.constexpr, ACC_DTYPE: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """The prior expert's mean and log-precision ``[BLOCK_D]`` (zeros without a prior)."""
    if HAS_PRIOR:
        offs = offs_d.to(tl.int64)
        prior_mu = tl.load(pmu_ptr + row * stride_pb + offs * stride_pd, mask=valid_d,
                           other=0.0).to(ACC_DTYPE)
        prior_l = -tl.load(plv_ptr + row * stride_qb + offs * stride_qd, mask=valid_d,
                           other=0.0).to(ACC_DTYPE)
    else:
        prior_mu = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
        prior_l = prior_mu
    return prior_mu, prior_l


@triton.jit
def _load_experts(mu_ptr, lv_ptr, mask_ptr, pmu_ptr, plv_ptr, row, first, last, offs_m, offs_d,
                  valid_d, M, stride_mb, stride_mm, stride_md, stride_vb, stride_vm,
                  stride_vd, stride_kb, stride_ks, stride_km, stride_pb, stride_pd, stride_qb,
                  stride_qd, HAS_PRIOR: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr,
                  MASK_ROW: tl.constexpr):
    """The experts a program needs for subsets ``[first, last)`` of ``row``: mu and -logvar
    ``[BLOCK_M, BLOCK_D]``, the prior's mean and log-precision ``[BLOCK_D]``, and which rows
    were read (``[BLOCK_M]`` bool). Only the rows of modalities some of those subsets hold are
    read (NaN in the others cannot leak)."""
    needed = members_used(mask_ptr, row, first, last, offs_m, M, stride_kb, stride_ks, stride_km,
                          MASK_ROW, BLOCK_M, CHUNK_S)
    mu = _load_rows(mu_ptr, row, offs_m, offs_d, needed, valid_d,
                    stride_mb, stride_mm, stride_md, ACC_DTYPE)
    neg_logvar = -_load_rows(lv_ptr, row, offs_m, offs_d, needed, valid_d,
                             stride_vb, stride_vm, stride_vd, ACC_DTYPE)
    prior_mu, prior_l = _load_prior(pmu_ptr, plv_ptr, row, offs_d, valid_d, stride_pb, stride_pd,
                                    stride_qb, stride_qd, HAS_PRIOR, ACC_DTYPE, BLOCK_D)
    return mu, neg_logvar, prior_mu, prior_l, needed


@triton.jit
def _shared_shift(neg_logvar, needed, prior_l, valid_d, max_range, first, last,
                  HAS_PRIOR: tl.constexpr, SHARED_SHIFT: tl.constexpr):
    """One shift per feature for all the program's subsets, whether it is safe, and so which
    path each of the subsets ``[first, last)`` takes.

    Returns ``shift [BLOCK_D]``, the largest log-precision of each column over the experts the
    program holds (0 for a column without any); ``narrow``, a scalar: whether in every column
    all of them lie within ``max_range`` of it; and ``split``: the shared-shift loop runs over
    ``[first, split)``, the per-subset loop over ``[split, last)``. When narrow,
    ``exp(l_j - shift)`` lies in ``[e^-max_range, 1]`` for every expert, far from underflow,
    and serves every subset (the weights are ratios, whatever the shift). Infinite
    log-precisions make it False; a NaN one reaches only the subsets that hold it, on either
    path.

    The paths are two loops, one of which runs no iteration, rather than the branches of an
    ``if``: Triton 3.6 miscompiles (a dominance error in its layout pass) values that the two
    branches of an ``if`` share, for float16/bfloat16 inputs. Without SHARED_SHIFT (one subset
    a row: nothing to share) the first loop is empty at compile time and compiled away.
    """
    inside = needed[:, None] & valid_d[None, :]
    top = tl.max(tl.where(inside, neg_logvar, float("-inf")), axis=0)
    low = tl.min(tl.where(inside, neg_logvar, float("inf")), axis=0)
    if HAS_PRIOR:
        top = tl.maximum(top, tl.where(valid_d, prior_l, float("-inf")))
        low = tl.minimum(low, tl.where(valid_d, prior_l, float("inf")))
    held = tl.sum(inside.to(tl.int32), axis=0) > 0
    if HAS_PRIOR:
        held = held | valid_d
    within = (top - low) <= max_range
    narrow = tl.min((within | ~held).to(tl.int32), axis=0) > 0
    if SHARED_SHIFT:
        split = tl.where(narrow, last, first)
    else:
        split = first
    return tl.where(held & within, top, 0.0), narrow, split


@triton.jit
def _shared_exps(neg_logvar, needed, prior_l, shift, HAS_PRIOR: tl.constexpr):
    """``e_j = exp(l_j - shift)`` ``[BLOCK_M, BLOCK_D]`` (0 for rows not read) and the prior's
    ``[BLOCK_D]`` (0 without a prior): computed once, not once per subset."""
    e = tl.where(needed[:, None], tl.exp(neg_logvar - shift[None, :]), 0.0)
    if HAS_PRIOR:
        e_prior = tl.exp(prior_l - shift)
    else:
        e_prior = tl.zeros_like(shift)
    return e, e_prior


@triton.jit
def _subset_product(member, mu, neg_logvar, prior_mu, prior_l, HAS_PRIOR: tl.constexpr):
    """The log-sum-exp pieces of the product over each subset of a chunk, each subset shifted
    by its own largest log-precision (the path for widely spread log-precisions).

    Args: member ``[CS, BM]``; mu, neg_logvar ``[BM, BD]``; prior_mu, prior_l ``[BD]``.
    Returns: e ``[CS, BM, BD]`` (``exp(l_j - c)``, 0 off the subset), e_prior ``[CS, BD]``,
    total T, c (0 where the product is empty) and out_mu, all ``[CS, BD]``.
    """
    inside = member[:, :, None]
    logprec = tl.where(inside, neg_logvar[None, :, :], float("-inf"))
    top = tl.max(logprec, axis=1)
    if HAS_PRIOR:
        top = tl.maximum(top, prior_l[None, :])
    # An empty product has no finite log-precision: shift by 0 so every exp below is exp(-inf).
    top = tl.where(top == float("-inf"), 0.0, top)
    e = tl.exp(logprec - top[:, None, :])
    total = tl.sum(e, axis=1)
    weighted = tl.sum(tl.where(inside, e * mu[None, :, :], 0.0), axis=1)
    if HAS_PRIOR:
        e_prior = tl.exp(prior_l[None, :] - top)
        total += e_prior
        weighted += e_prior * prior_mu[None, :]
    else:
        e_prior = tl.zeros_like(total)
    out_mu = weighted / tl.where(total != 0, total, 1.0)
    return e, e_prior, total, top, out_mu


@triton.jit
def _subset_sums(member, e, e_mu, e_prior, prior_mu, HAS_PRIOR: tl.constexpr):
    """``T_s = Σ_{j∈S} e_j (+ e_prior)`` and ``Σ_{j∈S} e_j mu_j (+ e_prior mu_prior)``,
    ``[CS, BD]`` each, from exps shared by the chunk's subsets: selections and sums only.
    (The prior's product is formed here, per chunk: formed once before the loop, Triton 3.6
    rewrote it to use a value of the loop body, a dominance error, for float16/bfloat16.)"""
    inside = member[:, :, None]
    total = tl.sum(tl.where(inside, e[None, :, :], 0.0), axis=1)
    weighted = tl.sum(tl.where(inside, e_mu[None, :, :], 0.0), axis=1)
    if HAS_PRIOR:
        total += e_prior[None, :]
        weighted += (e_prior * prior_mu)[None, :]
    return total, weighted


@triton.jit
def _inverse_or_zero(total):
    """``1 / T``, and 0 for an empty product (T = 0; a NaN T stays NaN)."""
    return tl.where(total != 0, 1.0 / tl.where(total != 0, total, 1.0), 0.0)


@triton.jit
def _store_outputs(out_mu_ptr, out_lv_ptr, row, offs_s, offs_d, last, valid_d, out_mu, out_lv,
                   stride_ob, stride_os):
    offs = row * stride_ob + offs_s.to(tl.int64)[:, None] * stride_os + offs_d[None, :]
    keep = (offs_s < last)[:, None] & valid_d[None, :]
    tl.store(out_mu_ptr + offs, out_mu.to(out_mu_ptr.dtype.element_ty), mask=keep)
    tl.store(out_lv_ptr + offs, out_lv.to(out_lv_ptr.dtype.element_ty), mask=keep)


@fast_launch
@triton.jit
def _poe_forward_kernel(
    mu_ptr, lv_ptr, mask_ptr, pmu_ptr, plv_ptr, out_mu_ptr, out_lv_ptr,
    S, M, D, subsets_per_program, max_range,
    stride_mb, stride_mm, stride_md,
    stride_vb, stride_vm, stride_vd,
    stride_kb, stride_ks, stride_km,
    stride_pb, stride_pd, stride_qb, stride_qd,
    stride_ob, stride_os,
    HAS_PRIOR: tl.constexpr, SHARED_SHIFT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr, MASK_ROW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = tl.program_id(2) * subsets_per_program
    last = tl.minimum(first + subsets_per_program, S)
    offs_m = tl.arange(0, BLOCK_M)
    chunk = tl.arange(0, CHUNK_S)
    valid_d = offs_d < D

    mu, neg_logvar, prior_mu, prior_l, needed = _load_experts(
        mu_ptr, lv_ptr, mask_ptr, pmu_ptr, plv_ptr, row, first, last, offs_m, offs_d,
        valid_d, M, stride_mb, stride_mm, stride_md, stride_vb, stride_vm, stride_vd,
        stride_kb, stride_ks, stride_km, stride_pb, stride_pd, stride_qb, stride_qd,
        HAS_PRIOR, ACC_DTYPE, BLOCK_M, BLOCK_D, CHUNK_S, MASK_ROW)
    shift, narrow, split = _shared_shift(neg_logvar, needed, prior_l, valid_d, max_range, first,
                                         last, HAS_PRIOR, SHARED_SHIFT)
    # Shared shift: one exp per expert and feature for all subsets; a subset costs selections
    # and sums, plus one exp and one log per feature for its log-variance.
    e, e_prior = _shared_exps(neg_logvar, needed, prior_l, shift, HAS_PRIOR)
    e_mu = e * mu
    for s0 in range(first, split, CHUNK_S):
        offs_s = s0 + chunk
        member = load_members(mask_ptr, row, offs_s, last, offs_m, M, stride_kb, stride_ks,
                              stride_km, MASK_ROW, BLOCK_M)
        total, weighted = _subset_sums(member, e, e_mu, e_prior, prior_mu, HAS_PRIOR)
        nonempty = total != 0
        safe_total = tl.where(nonempty, total, 1.0)
        out_mu = weighted / safe_total
        # -log Λ = -(top + log(T e^(shift - top))): the log of a number in [1, M + 1], as
        # precise as with a per-subset shift (log T alone would lose ~|log T| ulps).
        top = tl.max(tl.where(member[:, :, None], neg_logvar[None, :, :], float("-inf")),
                     axis=1)
        if HAS_PRIOR:
            top = tl.maximum(top, prior_l[None, :])
        top = tl.where(nonempty, top, shift[None, :])
        rel = safe_total * tl.exp(shift[None, :] - top)
        out_lv = tl.where(nonempty, -(top + tl.log(rel)), 0.0)
        _store_outputs(out_mu_ptr, out_lv_ptr, row, offs_s, offs_d, last, valid_d, out_mu,
                       out_lv, stride_ob, stride_os)
    # Per-subset shift.
    for s0 in range(split, last, CHUNK_S):
        offs_s = s0 + chunk
        member = load_members(mask_ptr, row, offs_s, last, offs_m, M, stride_kb, stride_ks,
                              stride_km, MASK_ROW, BLOCK_M)
        e_s, e_prior_s, total, top, out_mu = _subset_product(member, mu, neg_logvar, prior_mu,
                                                             prior_l, HAS_PRIOR)
        out_lv = tl.where(total != 0, -(top + tl.log(tl.where(total != 0, total, 1.0))), 0.0)
        _store_outputs(out_mu_ptr, out_lv_ptr, row, offs_s, offs_d, last, valid_d, out_mu,
                       out_lv, stride_ob, stride_os)


@triton.jit
def _load_grads(gmu_ptr, glv_ptr, row, offs_s, d64, last, valid_d, stride_gb, stride_gs,
                stride_gd, stride_hb, stride_hs, stride_hd, ACC_DTYPE: tl.constexpr):
    """Upstream gradients ``gμ, gv`` of a chunk's subsets, ``[CS, BD]`` each (0 off the edges)."""
    keep = (offs_s < last)[:, None] & valid_d[None, :]
    s64 = offs_s.to(tl.int64)[:, None]
    g_mu = tl.load(gmu_ptr + row * stride_gb + s64 * stride_gs + d64 * stride_gd,
                   mask=keep, other=0.0).to(ACC_DTYPE)
    g_lv = tl.load(glv_ptr + row * stride_hb + s64 * stride_hs + d64 * stride_hd,
                   mask=keep, other=0.0).to(ACC_DTYPE)
    return g_mu, g_lv


@fast_launch
@triton.jit
def _poe_backward_kernel(
    gmu_ptr, glv_ptr, mu_ptr, lv_ptr, mask_ptr, pmu_ptr, plv_ptr,
    dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr,
    B, S, M, D, splits, subsets_per_program, max_range,
    stride_gb, stride_gs, stride_gd,
    stride_hb, stride_hs, stride_hd,
    stride_mb, stride_mm, stride_md,
    stride_vb, stride_vm, stride_vd,
    stride_kb, stride_ks, stride_km,
    stride_pb, stride_pd, stride_qb, stride_qd,
    HAS_PRIOR: tl.constexpr, SHARED_SHIFT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_S: tl.constexpr, MASK_ROW: tl.constexpr,
):
    # Axis 0 is (row, part of the row's subsets), part fastest. With several parts each writes
    # its own partial sums (slab `part` of a workspace), reduced afterwards in a fixed order.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // splits
    part = pid % splits
    first = part * subsets_per_program
    last = tl.minimum(first + subsets_per_program, S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    chunk = tl.arange(0, CHUNK_S)
    valid_d = offs_d < D
    valid_m = offs_m < M

    mu, neg_logvar, prior_mu, prior_l, needed = _load_experts(
        mu_ptr, lv_ptr, mask_ptr, pmu_ptr, plv_ptr, row, first, last, offs_m, offs_d,
        valid_d, M, stride_mb, stride_mm, stride_md, stride_vb, stride_vm, stride_vd,
        stride_kb, stride_ks, stride_km, stride_pb, stride_pd, stride_qb, stride_qd,
        HAS_PRIOR, ACC_DTYPE, BLOCK_M, BLOCK_D, CHUNK_S, MASK_ROW)
    # The program's subsets, a chunk at a time, always in the same order: deterministic.
    shift, narrow, split = _shared_shift(neg_logvar, needed, prior_l, valid_d, max_range, first,
                                         last, HAS_PRIOR, SHARED_SHIFT)
    # Index-times-stride products in 64 bits: a latent-dim-first gradient has stride B*S on d.
    d64 = offs_d.to(tl.int64)[None, :]

    # Shared shift. With shared exps e_j, w_j = e_j / T_s factors out of every subset's sum:
    #   dmu_j = e_j A_j,   dlogvar_j = e_j (B_j - mu_j A_j),   A_j = Σ_{S∋j} gμ_S / T_S,
    #   B_j = Σ_{S∋j} (gv_S + gμ_S out_mu_S) / T_S,
    # so a subset costs selections and sums, no exp. Means are taken relative to a centre of
    # the row (`centre`), so that B_j - mu_j A_j cancels no more than mu_j - out_mu did.
    e, e_prior = _shared_exps(neg_logvar, needed, prior_l, shift, HAS_PRIOR)
    total_all = tl.sum(e, axis=0)
    weighted_all = tl.sum(e * mu, axis=0)
    if HAS_PRIOR:
        total_all += e_prior
        weighted_all += e_prior * prior_mu
    centre = weighted_all / tl.where(total_all != 0, total_all, 1.0)
    # An infinite or NaN mean must only reach the subsets that hold it.
    centre = tl.where(tl.abs(centre) < float("inf"), centre, 0.0)
    mu_c = mu - centre[None, :]
    e_mu = e * mu_c
    prior_mu_c = prior_mu - centre
    acc_a = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    prior_a = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    prior_b = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for s0 in range(first, split, CHUNK_S):
        offs_s = s0 + chunk
        member = load_members(mask_ptr, row, offs_s, last, offs_m, M, stride_kb, stride_ks,
                              stride_km, MASK_ROW, BLOCK_M)
        total, weighted = _subset_sums(member, e, e_mu, e_prior, prior_mu_c, HAS_PRIOR)
        inv_total = _inverse_or_zero(total)
        g_mu, g_lv = _load_grads(gmu_ptr, glv_ptr, row, offs_s, d64, last, valid_d,
                                 stride_gb, stride_gs, stride_gd, stride_hb, stride_hs,
                                 stride_hd, ACC_DTYPE)
        a = g_mu * inv_total                                          # [CS, BD]
        b = (g_lv + g_mu * (weighted * inv_total)) * inv_total
        inside = member[:, :, None]
        acc_a += tl.sum(tl.where(inside, a[:, None, :], 0.0), axis=0)
        acc_b += tl.sum(tl.where(inside, b[:, None, :], 0.0), axis=0)
        if HAS_PRIOR:
            prior_a += tl.sum(a, axis=0)
            prior_b += tl.sum(b, axis=0)

    # Per-subset shift, accumulating dmu, dlogvar, dprior_mu and dprior_logvar themselves in
    # acc_a, acc_b, prior_a and prior_b (only one of the two loops runs: registers are scarce).
    for s0 in range(split, last, CHUNK_S):
        offs_s = s0 + chunk
        member = load_members(mask_ptr, row, offs_s, last, offs_m, M, stride_kb, stride_ks,
                              stride_km, MASK_ROW, BLOCK_M)
        e_s, e_prior_s, total, top, out_mu = _subset_product(member, mu, neg_logvar, prior_mu,
                                                             prior_l, HAS_PRIOR)
        inv_total = _inverse_or_zero(total)
        g_mu, g_lv = _load_grads(gmu_ptr, glv_ptr, row, offs_s, d64, last, valid_d,
                                 stride_gb, stride_gs, stride_gd, stride_hb, stride_hs,
                                 stride_hd, ACC_DTYPE)
        inside = member[:, :, None]
        # w_j, 0 off S: selected, as a NaN T (a NaN log-variance in S) times e_j = 0 is NaN.
        weight = tl.where(inside, e_s * inv_total[:, None, :], 0.0)
        spread = tl.where(inside, mu[None, :, :] - out_mu[:, None, :], 0.0)  # mu_j - out_mu
        acc_a += tl.sum(weight * g_mu[:, None, :], axis=0)
        acc_b += tl.sum(weight * (g_lv[:, None, :] - g_mu[:, None, :] * spread), axis=0)
        if HAS_PRIOR:
            w_prior = e_prior_s * inv_total
            prior_a += tl.sum(w_prior * g_mu, axis=0)
            prior_b += tl.sum(w_prior * (g_lv - g_mu * (prior_mu[None, :] - out_mu)), axis=0)

    # Off the shared-shift path e may hold inf (a wide spread, shifted by 0): select, so that
    # 0 · inf cannot reach the result.
    if SHARED_SHIFT:
        dmu = tl.where(narrow, e * acc_a, acc_a)
        dlv = tl.where(narrow, e * (acc_b - mu_c * acc_a), acc_b)
        dpmu = tl.where(narrow, e_prior * prior_a, prior_a)
        dplv = tl.where(narrow, e_prior * (prior_b - prior_mu_c * prior_a), prior_b)
    else:
        dmu, dlv, dpmu, dplv = acc_a, acc_b, prior_a, prior_b

    # Gradients are contiguous [splits, B, M, D] and [splits, B, D] (splits = 1: the result).
    slab = part * B + row
    tile = slab * M * D + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    store = valid_m[:, None] & valid_d[None, :]
    tl.store(dmu_ptr + tile, dmu.to(dmu_ptr.dtype.element_ty), mask=store)
    tl.store(dlv_ptr + tile, dlv.to(dlv_ptr.dtype.element_ty), mask=store)
    if HAS_PRIOR:
        flat = slab * D + offs_d
        tl.store(dpmu_ptr + flat, dpmu.to(dpmu_ptr.dtype.element_ty), mask=valid_d)
        tl.store(dplv_ptr + flat, dplv.to(dplv_ptr.dtype.element_ty), mask=valid_d)


def _per_subset_strides(t: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int]:
    """(b, s, d) strides of an output-shaped tensor ``[B, (S,) d]``."""
    if mask.dim() == 2:
        return t.stride(0), 0, t.stride(1)
    return tuple(t.stride())


def _blocks(S: int, M: int, D: int) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_D, CHUNK_S, num_warps: the [CHUNK_S, BLOCK_M, BLOCK_D] working set stays
    within a register budget on the GPU; the interpreter takes big tiles (few programs)."""
    budget = 1 << 16 if triton_interpreting() else 4096
    block_m = next_power_of_2(max(M, 1))
    block_d = min(next_power_of_2(D), 4096 if triton_interpreting() else 128,
                  max(16, budget // block_m))
    chunk_s = min(next_power_of_2(max(S, 1)), max(1, budget // (block_m * block_d)))
    warps = 8 if block_m * block_d >= 2048 else 4
    return block_m, block_d, chunk_s, warps


# The shared-shift path (see `_shared_shift`) runs where a program's log-precisions span at most
# this much in every feature: exps stay >= e^-30 (float32 is normal down to e^-87) and 1 / T
# stays <= e^30, so gμ / T cannot overflow for any gradient below ~1e25. logvar in [-15, 15],
# or any spread that trained posteriors show in practice, takes it; wider spreads take the
# per-subset shift, as exact but with an exp per expert and subset.
SHARED_SHIFT_RANGE = 30.0

# Partial-sum slabs the backward may split a row's subsets into (bounds its fp32 workspace).
_MAX_BACKWARD_SPLITS = 8


def _sum_parts(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[P, ...]`` partial sums -> their sum in ``dtype``, contiguous. A plain reduction over
    the leading axis (no atomics), so the result is the same on every run."""
    if parts.shape[0] == 1:
        return parts[0]
    return parts.sum(dim=0).to(dtype)


def _prior_strides(prior_mu, prior_logvar, fallback):
    if prior_mu is None:
        return fallback, fallback, (0, 0), (0, 0)
    return prior_mu, prior_logvar, prior_mu.stride(), prior_logvar.stride()


def gaussian_poe_forward(mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor,
                         prior_mu: torch.Tensor | None,
                         prior_logvar: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Implementation of ``mmfast::gaussian_poe``.

    Args:
        mu, logvar: ``[B, M, d]``, any strides.
        mask: bool ``[B, M]`` or ``[B, S, M]``, any strides.
        prior_mu, prior_logvar: ``[B, d]`` (stride 0 allowed) or both None.
    Returns:
        contiguous ``(mu, logvar)``, each ``[B, (S,) d]`` in ``mu.dtype``.
    """
    B, M, D = mu.shape
    mask_bytes, S, (skb, sks, skm) = mask_layout(mask)
    shape = (*mask.shape[:-1], D)
    out_mu = torch.empty(shape, dtype=mu.dtype, device=mu.device)
    out_lv = torch.empty(shape, dtype=mu.dtype, device=mu.device)
    if out_mu.numel() == 0:
        return out_mu, out_lv
    block_m, block_d, chunk_s, warps = _blocks(S, M, D)
    chunks = cdiv(S, chunk_s)
    programs = B * cdiv(D, block_d)
    # On the GPU, split a row's subsets over programs when rows alone would leave SMs idle.
    splits = 1 if triton_interpreting() else max(1, min(chunks, cdiv(4096, programs)))
    per_program = cdiv(chunks, splits) * chunk_s
    grid = (B, cdiv(D, block_d), cdiv(S, per_program))
    pmu, plv, (spb, spd), (sqb, sqd) = _prior_strides(prior_mu, prior_logvar, mu)
    _, sos, _ = _per_subset_strides(out_mu, mask)
    _poe_forward_kernel[grid](
        mu, logvar, mask_bytes, pmu, plv, out_mu, out_lv,
        S, M, D, per_program, SHARED_SHIFT_RANGE,
        *mu.stride(), *logvar.stride(),
        skb, sks, skm,
        spb, spd, sqb, sqd,
        out_mu.stride(0), sos,
        HAS_PRIOR=prior_mu is not None, SHARED_SHIFT=S > 1, ACC_DTYPE=acc_dtype(mu.dtype),
        BLOCK_M=block_m, BLOCK_D=block_d, CHUNK_S=chunk_s,
        MASK_ROW=mask_row(mask_bytes, M, block_m, (skb, sks, skm)), num_warps=warps,
    )
    return out_mu, out_lv


def gaussian_poe_backward(grad_mu: torch.Tensor, grad_logvar: torch.Tensor, mu: torch.Tensor,
                          logvar: torch.Tensor, mask: torch.Tensor,
                          prior_mu: torch.Tensor | None, prior_logvar: torch.Tensor | None,
                          out_mu: torch.Tensor, out_logvar: torch.Tensor):
    """Implementation of ``mmfast::gaussian_poe_backward``.

    Args:
        grad_mu, grad_logvar: ``[B, (S,) d]`` upstream gradients, any strides.
        mu, logvar, mask, prior_mu, prior_logvar: the forward's inputs.
        out_mu, out_logvar: the forward's outputs (unused: recomputed in full precision).
    Returns:
        ``(dmu, dlogvar, dprior_mu, dprior_logvar)``: ``[B, M, d]``, ``[B, M, d]`` and
        ``[B, d]`` twice (empty tensors when there is no prior), contiguous, in ``mu.dtype``.
    """
    B, M, D = mu.shape
    mask_bytes, S, (skb, sks, skm) = mask_layout(mask)
    has_prior = prior_mu is not None
    if B * D == 0:
        return (mu.new_empty((B, M, D)), mu.new_empty((B, M, D)),
                mu.new_empty((B, D) if has_prior else 0), mu.new_empty((B, D) if has_prior else 0))
    block_m, block_d, chunk_s, warps = _blocks(S, M, D)
    d_blocks = cdiv(D, block_d)
    chunks = cdiv(S, chunk_s)
    # On the GPU, few rows would leave most SMs idle with one program per row: split the
    # subsets over a few programs that write fp32 partial sums, then add the parts in order.
    splits = 1 if triton_interpreting() else max(
        1, min(chunks, _MAX_BACKWARD_SPLITS, cdiv(1024, max(1, B * d_blocks))))
    per_program = max(1, cdiv(chunks, splits)) * chunk_s
    splits = max(1, cdiv(S, per_program))
    work = mu.dtype if splits == 1 else torch.promote_types(mu.dtype, torch.float32)
    dmu = torch.empty((splits, B, M, D), dtype=work, device=mu.device)
    dlv = torch.empty((splits, B, M, D), dtype=work, device=mu.device)
    dpmu = mu.new_empty((splits, B, D), dtype=work) if has_prior else mu.new_empty(0)
    dplv = mu.new_empty((splits, B, D), dtype=work) if has_prior else mu.new_empty(0)
    pmu, plv, (spb, spd), (sqb, sqd) = _prior_strides(prior_mu, prior_logvar, mu)
    _poe_backward_kernel[(B * splits, d_blocks)](
        grad_mu, grad_logvar, mu, logvar, mask_bytes, pmu, plv,
        dmu, dlv, dpmu if has_prior else dmu, dplv if has_prior else dlv,
        B, S, M, D, splits, per_program, SHARED_SHIFT_RANGE,
        *_per_subset_strides(grad_mu, mask), *_per_subset_strides(grad_logvar, mask),
        *mu.stride(), *logvar.stride(),
        skb, sks, skm,
        spb, spd, sqb, sqd,
        HAS_PRIOR=has_prior, SHARED_SHIFT=S > 1, ACC_DTYPE=acc_dtype(mu.dtype),
        BLOCK_M=block_m, BLOCK_D=block_d, CHUNK_S=chunk_s,
        MASK_ROW=mask_row(mask_bytes, M, block_m, (skb, sks, skm)), num_warps=warps,
    )
    dmu, dlv = _sum_parts(dmu, mu.dtype), _sum_parts(dlv, mu.dtype)
    if has_prior:
        dpmu, dplv = _sum_parts(dpmu, mu.dtype), _sum_parts(dplv, mu.dtype)
    return dmu, dlv, dpmu, dplv
