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
  costs sums over its members: ``S·M·d`` exps become ``M·d`` (forward and backward), plus one
  log per subset and feature for ``log Λ = shift + log T`` in the forward. Every expert row
  the program reads must be finite too, with means (the prior's too) below 1e38: then
  ``e_j``, ``e_j mu_j`` and ``e_j (mu_j - centre)`` are, and a subset's sums multiply them by
  its 0/1 membership (one fused multiply-add each; the prior, in every subset, is added
  unselected). The price is precision, deliberately: ``l_j - shift`` is rounded at the
  magnitude of the span before its exp, so ``log Λ`` carries an absolute error of up to about
  an ulp of the span (~2e-6 in float32 at the widest, 30; measured under the interpreter, ~5x
  the per-subset maximum's for singleton subsets, ~1.6x in the worst case).
- Per-subset shift: otherwise (a wider spread, an inf or NaN), each subset is shifted by its
  own maximum, as above, and members are selected, so a NaN reaches only the subsets (and the
  gradients of the members of the subsets) that hold it.

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
CHUNK_S, working on ``[CHUNK_S, BLOCK_M, BLOCK_D]`` selections. For up to 8 modalities in
float32 (4 in 16-bit types; ROW_BITS) the tiles are loaded in that shape, so that Triton lays
the selections out as the load: a 16-byte vector of features of every modality in each
thread's registers, lanes and warps along the features and, where the features leave lanes
over, along the chunk's subsets (X_ROWS). Each thread then reads a subset's membership once
as a bit set and sums over modalities in its registers. At the 255-subset bank, M = 8,
float32 (sm_90 SASS, Triton 3.6), the shared-shift loops take 74 (forward) and 67 (backward)
instructions per output element at d = 512, 75 and 67 at d = 64, without shared memory or
spills; Triton's default layout of the earlier tiles took 131 and 150 at d = 512, 196 and
204 at d = 64. More modalities, and float64, keep the default layout. On the GPU, when rows
alone would leave SMs idle, the forward splits the subsets of a row over several programs, and
so does the backward: each of its parts writes partial sums to its own slab of a float32
workspace, and the slabs are added afterwards by one reduction. Every sum is over a fixed
order (deterministic, no atomics). Every tensor is read by strides: a stride-0 bank and a
stride-0 prior (the N(0, I) expert, or a ``[d]`` prior expanded to ``[B, d]``) are never
materialised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.backend import triton_interpreting
from mmfast.kernels._common import acc_dtype, cdiv, lane_rows, next_power_of_2
from mmfast.kernels._launch import fast_launch
from mmfast.kernels._masks import (USED_BYTES, chunk_flags, chunk_members, mask_layout,
                                   mask_row, members_used)


@triton.jit
def _load_rows(ptr, row, offs_m, offs_d, needed, valid_d, stride_b, stride_m, stride_d,
               ACC_DTYPE: tl.constexpr, ROW_BITS: tl.constexpr, X_ROWS: tl.constexpr):
    """``[X_ROWS, BLOCK_M, BLOCK_D]`` tile of an expert parameter (X_ROWS copies of its
    ``[BLOCK_M, BLOCK_D]`` rows; X_ROWS is 1 off the ROW_BITS path); rows not ``needed`` are not
    read. With ROW_BITS it is loaded in that shape, the shape of the per-chunk selections
    ``[CHUNK_S, BLOCK_M, BLOCK_D]``, which Triton then lays out as this load: a 16-byte vector
    of features of every modality in each thread's registers, lanes and warps along the
    features and then (X_ROWS = CHUNK_S) the chunk's subsets (see the module docstring)."""
    ptrs = (ptr + row * stride_b + offs_m.to(tl.int64)[:, None] * stride_m
            + offs_d.to(tl.int64)[None, :] * stride_d)
    keep = needed[:, None] & valid_d[None, :]
    if ROW_BITS:
        tile = tl.load(ptrs[None, :, :] + 0 * tl.arange(0, X_ROWS)[:, None, None],
                       mask=keep[None, :, :], other=0.0)
    else:
        tile = tl.load(ptrs, mask=keep, other=0.0)[None, :, :]
    return tile.to(ACC_DTYPE)


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


# Means the shared-shift path takes (see _shared_shift), the prior's included, since the centre
# weighs it too: mu_j - centre (|centre| <= max |mu|) stays finite in float32, so 0/1 flags
# times e_j (mu_j - centre) cannot make 0 · inf = NaN in subsets without j. Larger means take
# the per-subset path (float64 ones too: same result).
MEAN_BOUND = tl.constexpr(1e38)


@triton.jit
def _shared_shift(mu, neg_logvar, needed, prior_mu, prior_l, valid_d, max_range, first, last,
                  HAS_PRIOR: tl.constexpr, SHARED_SHIFT: tl.constexpr):
    """One shift per feature for all the program's subsets, whether it is safe, and so which
    path each of the subsets ``[first, last)`` takes.

    Args: mu, neg_logvar ``[X_ROWS, BLOCK_M, BLOCK_D]``; needed ``[BLOCK_M]`` (the rows read);
    prior_mu, prior_l, valid_d ``[BLOCK_D]``.
    Returns ``shift [X_ROWS, BLOCK_D]``, the largest log-precision of each column over the experts
    the program holds (0 for a column without any); ``narrow``, a scalar: whether in every
    column all of them lie within ``max_range`` of it and every mean and log-precision the
    program read is finite, the means (the prior's too) below MEAN_BOUND; and ``split``: the
    shared-shift loop runs over ``[first, split)``, the per-subset loop over ``[split, last)``.
    When narrow, ``e_j = exp(l_j - shift)`` lies in ``[e^-max_range, 1]`` for every expert, far
    from underflow, and serves every subset (the weights are ratios, whatever the shift); and
    ``e_j`` and ``e_j mu_j`` are finite, so that a subset's sums may multiply them by its 0/1
    membership (an inf or NaN would leak into the subsets without j as 0 · inf = NaN). Programs
    with an infinite or NaN parameter take the per-subset path, which selects, so a NaN reaches
    only the subsets that hold it.

    The paths are two loops, one of which runs no iteration, rather than the branches of an
    ``if``: Triton 3.6 miscompiles (a dominance error in its layout pass) values that the two
    branches of an ``if`` share, for float16/bfloat16 inputs. Without SHARED_SHIFT (one subset
    a row: nothing to share) the first loop is empty at compile time and compiled away.
    """
    inside = needed[None, :, None] & valid_d[None, None, :]
    top = tl.max(tl.where(inside, neg_logvar, float("-inf")), axis=1)
    low = tl.min(tl.where(inside, neg_logvar, float("inf")), axis=1)
    # Means below MEAN_BOUND: the backward's mu_j - centre must not overflow either (it
    # multiplies the flags too).
    finite = tl.where(inside, (tl.abs(neg_logvar) < float("inf")) & (tl.abs(mu) < MEAN_BOUND),
                      True)
    held = tl.sum(inside.to(tl.int32), axis=1) > 0
    if HAS_PRIOR:
        top = tl.maximum(top, tl.where(valid_d, prior_l, float("-inf"))[None, :])
        low = tl.minimum(low, tl.where(valid_d, prior_l, float("inf"))[None, :])
        held = held | valid_d[None, :]
        # The prior's mean is in every subset, so in the centre too: bounded like the experts'
        # (a NaN or inf one fails the test as well; 0 beyond D).
        finite = finite & (tl.abs(prior_mu) < MEAN_BOUND)[None, None, :]
    within = (top - low) <= max_range
    narrow = (tl.min(tl.min((within | ~held).to(tl.int32), axis=1), axis=0) > 0) & (
        tl.min(tl.min(tl.min(finite.to(tl.int32), axis=2), axis=1), axis=0) > 0)
    if SHARED_SHIFT:
        split = tl.where(narrow, last, first)
    else:
        split = first
    return tl.where(held & within, top, 0.0), narrow, split


@triton.jit
def _load_experts(mu_ptr, lv_ptr, mask_ptr, pmu_ptr, plv_ptr, row, first, last, offs_m, offs_d,
                  valid_d, M, max_range, stride_mb, stride_mm, stride_md, stride_vb, stride_vm,
                  stride_vd, stride_kb, stride_ks, stride_km, stride_pb, stride_pd, stride_qb,
                  stride_qd, HAS_PRIOR: tl.constexpr, SHARED_SHIFT: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  CHUNK_S: tl.constexpr, MASK_ROW: tl.constexpr, ROW_BITS: tl.constexpr,
                  X_ROWS: tl.constexpr):
    """The experts a program needs for subsets ``[first, last)`` of ``row`` and its shift:
    which rows it read (``[BLOCK_M]`` bool: only those of modalities some of those subsets
    hold, so a missing modality's, possibly NaN, never are), mu and -logvar
    ``[X_ROWS, BLOCK_M, BLOCK_D]``, the prior's mean and log-precision ``[BLOCK_D]``, and
    :func:`_shared_shift`'s shift, narrow and split."""
    needed = members_used(mask_ptr, row, first, last, offs_m, M, stride_kb, stride_ks, stride_km,
                          MASK_ROW, BLOCK_M, max(CHUNK_S, USED_BYTES // BLOCK_M))
    mu = _load_rows(mu_ptr, row, offs_m, offs_d, needed, valid_d, stride_mb, stride_mm,
                    stride_md, ACC_DTYPE, ROW_BITS, X_ROWS)
    neg_logvar = -_load_rows(lv_ptr, row, offs_m, offs_d, needed, valid_d, stride_vb, stride_vm,
                             stride_vd, ACC_DTYPE, ROW_BITS, X_ROWS)
    prior_mu, prior_l = _load_prior(pmu_ptr, plv_ptr, row, offs_d, valid_d, stride_pb, stride_pd,
                                    stride_qb, stride_qd, HAS_PRIOR, ACC_DTYPE, BLOCK_D)
    shift, narrow, split = _shared_shift(mu, neg_logvar, needed, prior_mu, prior_l, valid_d,
                                         max_range, first, last, HAS_PRIOR, SHARED_SHIFT)
    return needed, mu, neg_logvar, prior_mu, prior_l, shift, narrow, split


@triton.jit
def _per_subset_chunk(mu_ptr, lv_ptr, mask_ptr, row, offs_s, last, offs_m, offs_d, needed,
                      valid_d, M, prior_mu, prior_l, stride_mb, stride_mm, stride_md, stride_vb,
                      stride_vm, stride_vd, stride_kb, stride_ks, stride_km,
                      HAS_PRIOR: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                      MASK_ROW: tl.constexpr, ROW_BITS: tl.constexpr, X_ROWS: tl.constexpr):
    """A chunk of the per-subset path: its membership ``[CS, BM, 1]``, the means
    ``[X_ROWS, BM, BD]`` and :func:`_subset_product`'s pieces. The experts are read again (from
    cache) rather than held in registers through the shared-shift loops, which need only their
    exps."""
    member = chunk_members(mask_ptr, row, offs_s, last, offs_m, M, stride_kb, stride_ks,
                           stride_km, MASK_ROW, BLOCK_M, ROW_BITS)
    mu = _load_rows(mu_ptr, row, offs_m, offs_d, needed, valid_d, stride_mb, stride_mm,
                    stride_md, ACC_DTYPE, ROW_BITS, X_ROWS)
    neg_logvar = -_load_rows(lv_ptr, row, offs_m, offs_d, needed, valid_d, stride_vb, stride_vm,
                             stride_vd, ACC_DTYPE, ROW_BITS, X_ROWS)
    e, e_prior, total, top, out_mu = _subset_product(member, mu, neg_logvar, prior_mu, prior_l,
                                                     HAS_PRIOR)
    return member, mu, e, e_prior, total, top, out_mu


@triton.jit
def _shared_exps(neg_logvar, needed, prior_l, shift, HAS_PRIOR: tl.constexpr):
    """``e_j = exp(l_j - shift)`` ``[X_ROWS, BLOCK_M, BLOCK_D]`` (0 for rows not read) and the
    prior's ``[X_ROWS, BLOCK_D]`` (0 without a prior): computed once, not once per subset."""
    e = tl.where(needed[None, :, None], tl.exp(neg_logvar - shift[:, None, :]), 0.0)
    if HAS_PRIOR:
        e_prior = tl.exp(prior_l[None, :] - shift)
    else:
        e_prior = tl.zeros_like(shift)
    return e, e_prior


@triton.jit
def _subset_product(member, mu, neg_logvar, prior_mu, prior_l, HAS_PRIOR: tl.constexpr):
    """The log-sum-exp pieces of the product over each subset of a chunk, each subset shifted
    by its own largest log-precision (the path for widely spread or non-finite parameters).

    Args: member ``[CS, BM, 1]``; mu, neg_logvar ``[X_ROWS, BM, BD]``; prior_mu, prior_l
    ``[BD]``.
    Returns: e ``[CS, BM, BD]`` (``exp(l_j - c)``, 0 off the subset), e_prior ``[CS, BD]``,
    total T, c (0 where the product is empty) and out_mu, all ``[CS, BD]``.
    """
    logprec = tl.where(member, neg_logvar, float("-inf"))
    top = tl.max(logprec, axis=1)
    if HAS_PRIOR:
        top = tl.maximum(top, prior_l[None, :])
    # An empty product has no finite log-precision: shift by 0 so every exp below is exp(-inf).
    top = tl.where(top == float("-inf"), 0.0, top)
    e = tl.exp(logprec - top[:, None, :])
    total = tl.sum(e, axis=1)
    weighted = tl.sum(tl.where(member, e * mu, 0.0), axis=1)
    if HAS_PRIOR:
        e_prior = tl.exp(prior_l[None, :] - top)
        total += e_prior
        weighted += e_prior * prior_mu[None, :]
    else:
        e_prior = tl.zeros_like(total)
    out_mu = weighted / tl.where(total != 0, total, 1.0)
    return e, e_prior, total, top, out_mu


@triton.jit
def _subset_sums(flags, e, e_mu, e_prior, prior_mu, HAS_PRIOR: tl.constexpr):
    """``T_s = Σ_{j∈S} e_j (+ e_prior)`` and ``Σ_{j∈S} e_j mu_j (+ e_prior mu_prior)``,
    ``[CS, BD]`` each, from exps shared by the chunk's subsets (flags: 0/1 int ``[CS, BM, 1]``;
    e and e_mu ``[X_ROWS, BM, BD]``, finite: see :func:`_shared_shift`; e_prior, prior_mu
    ``[X_ROWS, BD]``). The 0/1 membership multiplies:
    one fused multiply-add a modality and feature, where a selection and an add took two, with
    the same result (1 · x + acc rounds as x + acc; 0 · x adds a zero).
    (The prior's product is formed here, per chunk: formed once before the loop, Triton 3.6
    rewrote it to use a value of the loop body, a dominance error, for float16/bfloat16.)"""
    flag = flags.to(e.dtype)
    total = tl.sum(flag * e, axis=1)
    weighted = tl.sum(flag * e_mu, axis=1)
    if HAS_PRIOR:
        total += e_prior
        weighted += e_prior * prior_mu
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
    ROW_BITS: tl.constexpr, X_ROWS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = tl.program_id(2) * subsets_per_program
    last = tl.minimum(first + subsets_per_program, S)
    offs_m = tl.arange(0, BLOCK_M)
    chunk = tl.arange(0, CHUNK_S)
    valid_d = offs_d < D

    needed, mu, neg_logvar, prior_mu, prior_l, shift, narrow, split = _load_experts(
        mu_ptr, lv_ptr, mask_ptr, pmu_ptr, plv_ptr, row, first, last, offs_m, offs_d, valid_d, M,
        max_range, stride_mb, stride_mm, stride_md, stride_vb, stride_vm, stride_vd, stride_kb,
        stride_ks, stride_km, stride_pb, stride_pd, stride_qb, stride_qd, HAS_PRIOR,
        SHARED_SHIFT, ACC_DTYPE, BLOCK_M, BLOCK_D, CHUNK_S, MASK_ROW, ROW_BITS, X_ROWS)
    # Shared shift: one exp per expert and feature for all subsets; a subset costs its sums
    # over members, plus one log per feature for its log-variance.
    e, e_prior = _shared_exps(neg_logvar, needed, prior_l, shift, HAS_PRIOR)
    e_mu = e * mu
    for s0 in range(first, split, CHUNK_S):
        offs_s = s0 + chunk
        flags = chunk_flags(mask_ptr, row, offs_s, last, offs_m, M, stride_kb, stride_ks,
                            stride_km, MASK_ROW, BLOCK_M, ROW_BITS)            # [CS, BM, 1]
        total, weighted = _subset_sums(flags, e, e_mu, e_prior, prior_mu[None, :], HAS_PRIOR)
        nonempty = total != 0
        safe_total = tl.where(nonempty, total, 1.0)
        # -log Λ = -(shift + log T). Its absolute error is up to about an ulp of the span of
        # the program's log-precisions (each l_j - shift is rounded at that magnitude before
        # its exp): ~2e-6 in float32 for the widest span the path takes, 30. A per-subset
        # maximum is exact for the subset's largest expert, at 16 instructions an element.
        out_lv = tl.where(nonempty, -(shift + tl.log(safe_total)), 0.0)
        _store_outputs(out_mu_ptr, out_lv_ptr, row, offs_s, offs_d, last, valid_d,
                       weighted / safe_total, out_lv, stride_ob, stride_os)
    # Per-subset shift.
    for s0 in range(split, last, CHUNK_S):
        offs_s = s0 + chunk
        member, mu_s, e_s, e_prior_s, total, top, out_mu = _per_subset_chunk(
            mu_ptr, lv_ptr, mask_ptr, row, offs_s, last, offs_m, offs_d, needed, valid_d, M,
            prior_mu, prior_l, stride_mb, stride_mm, stride_md, stride_vb, stride_vm, stride_vd,
            stride_kb, stride_ks, stride_km, HAS_PRIOR, ACC_DTYPE, BLOCK_M, MASK_ROW, ROW_BITS,
            X_ROWS)
        out_lv = tl.where(total != 0, -(top + tl.log(tl.where(total != 0, total, 1.0))), 0.0)
        _store_outputs(out_mu_ptr, out_lv_ptr, row, offs_s, offs_d, last, valid_d, out_mu,
                       out_lv, stride_ob, stride_os)


@triton.jit
def _add_members(acc, member, x, X_ROWS: tl.constexpr, CHUNK_S: tl.constexpr):
    """``acc [X_ROWS, BM, BD] + Σ_s member[s] x[s]`` (x ``[CS, 1 or BM, BD]``), selected, not
    multiplied (a NaN x of one subset reaches only its members). Where each row of acc takes
    one subset (X_ROWS = CS), as ``where(member, acc + x, acc)``: ptxas makes it one predicated
    fused multiply-add a modality and feature (sm_90, Triton 3.6: the backward's shared-shift
    loop went from 87 to 67 instructions per element), where adding a selected zero took a
    select and an add."""
    if X_ROWS == CHUNK_S:
        acc = tl.where(member, acc + x, acc)
    else:
        acc += tl.sum(tl.where(member, x, 0.0), axis=0, keep_dims=True)
    return acc


@triton.jit
def _over_chunk(x, X_ROWS: tl.constexpr):
    """A chunk's contribution ``[CS, BM, BD]`` to sums held as ``[X_ROWS, BM, BD]``: summed over
    its subsets (X_ROWS = 1), or kept per subset (X_ROWS = CS, lanes along the subsets)."""
    if X_ROWS == 1:
        x = tl.sum(x, axis=0, keep_dims=True)
    return x


@triton.jit
def _load_grads(gmu_ptr, glv_ptr, row, offs_s, d64, last, valid_d, stride_gb, stride_gs,
                stride_gd, stride_hb, stride_hs, stride_hd, ACC_DTYPE: tl.constexpr,
                ROW_BITS: tl.constexpr):
    """Upstream gradients ``gμ, gv`` of a chunk's subsets, ``[CS, 1, BD]`` each (0 off the
    edges); with ROW_BITS loaded in that shape, the layout of the selections (as the experts)."""
    keep = (offs_s < last)[:, None] & valid_d[None, :]
    s64 = offs_s.to(tl.int64)[:, None]
    g_mu_ptrs = gmu_ptr + row * stride_gb + s64 * stride_gs + d64 * stride_gd
    g_lv_ptrs = glv_ptr + row * stride_hb + s64 * stride_hs + d64 * stride_hd
    if ROW_BITS:
        g_mu = tl.load(g_mu_ptrs[:, None, :], mask=keep[:, None, :], other=0.0)
        g_lv = tl.load(g_lv_ptrs[:, None, :], mask=keep[:, None, :], other=0.0)
    else:
        g_mu = tl.load(g_mu_ptrs, mask=keep, other=0.0)[:, None, :]
        g_lv = tl.load(g_lv_ptrs, mask=keep, other=0.0)[:, None, :]
    return g_mu.to(ACC_DTYPE), g_lv.to(ACC_DTYPE)


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
    ROW_BITS: tl.constexpr, X_ROWS: tl.constexpr,
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

    needed, mu, neg_logvar, prior_mu, prior_l, shift, narrow, split = _load_experts(
        mu_ptr, lv_ptr, mask_ptr, pmu_ptr, plv_ptr, row, first, last, offs_m, offs_d, valid_d, M,
        max_range, stride_mb, stride_mm, stride_md, stride_vb, stride_vm, stride_vd, stride_kb,
        stride_ks, stride_km, stride_pb, stride_pd, stride_qb, stride_qd, HAS_PRIOR,
        SHARED_SHIFT, ACC_DTYPE, BLOCK_M, BLOCK_D, CHUNK_S, MASK_ROW, ROW_BITS, X_ROWS)
    # Index-times-stride products in 64 bits: a latent-dim-first gradient has stride B*S on d.
    d64 = offs_d.to(tl.int64)[None, :]

    # Shared shift. With shared exps e_j, w_j = e_j / T_s factors out of every subset's sum:
    #   dmu_j = e_j A_j,   dlogvar_j = e_j (B_j - mu_j A_j),   A_j = Σ_{S∋j} gμ_S / T_S,
    #   B_j = Σ_{S∋j} (gv_S + gμ_S out_mu_S) / T_S,
    # so a subset costs its sums, no exp. Means are taken relative to a centre of the row
    # (`centre`), so that B_j - mu_j A_j cancels no more than mu_j - out_mu did.
    e, e_prior = _shared_exps(neg_logvar, needed, prior_l, shift, HAS_PRIOR)
    total_all = tl.sum(e, axis=1)
    weighted_all = tl.sum(e * mu, axis=1)
    if HAS_PRIOR:
        total_all += e_prior
        weighted_all += e_prior * prior_mu[None, :]
    centre = weighted_all / tl.where(total_all != 0, total_all, 1.0)     # [X_ROWS, BD]
    # An infinite or NaN mean must only reach the subsets that hold it.
    centre = tl.where(tl.abs(centre) < float("inf"), centre, 0.0)
    e_mu = e * (mu - centre[:, None, :])
    prior_mu_c = prior_mu[None, :] - centre
    # With X_ROWS = CHUNK_S the lanes along the chunk's subsets keep their own partial sums,
    # added across lanes once after the loops (as the pool's backward).
    acc_a = tl.zeros((X_ROWS, BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    acc_b = tl.zeros((X_ROWS, BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    prior_a = tl.zeros((X_ROWS, BLOCK_D), dtype=ACC_DTYPE)
    prior_b = tl.zeros((X_ROWS, BLOCK_D), dtype=ACC_DTYPE)
    # The program's subsets, a chunk at a time, always in the same order: deterministic.
    for s0 in range(first, split, CHUNK_S):
        offs_s = s0 + chunk
        flags = chunk_flags(mask_ptr, row, offs_s, last, offs_m, M, stride_kb, stride_ks,
                            stride_km, MASK_ROW, BLOCK_M, ROW_BITS)            # [CS, BM, 1]
        member = flags != 0
        total, weighted = _subset_sums(flags, e, e_mu, e_prior, prior_mu_c, HAS_PRIOR)
        inv_total = _inverse_or_zero(total)[:, None, :]                       # [CS, 1, BD]
        g_mu, g_lv = _load_grads(gmu_ptr, glv_ptr, row, offs_s, d64, last, valid_d,
                                 stride_gb, stride_gs, stride_gd, stride_hb, stride_hs,
                                 stride_hd, ACC_DTYPE, ROW_BITS)              # [CS, 1, BD]
        a = g_mu * inv_total
        b = (g_lv + g_mu * (weighted[:, None, :] * inv_total)) * inv_total
        # Selected, not multiplied: an inf or NaN upstream gradient of one subset reaches only
        # the gradients of its own members.
        acc_a = _add_members(acc_a, member, a, X_ROWS, CHUNK_S)
        acc_b = _add_members(acc_b, member, b, X_ROWS, CHUNK_S)
        if HAS_PRIOR:
            prior_a += tl.sum(_over_chunk(a, X_ROWS), axis=1)
            prior_b += tl.sum(_over_chunk(b, X_ROWS), axis=1)

    # Per-subset shift, accumulating dmu, dlogvar, dprior_mu and dprior_logvar themselves in
    # acc_a, acc_b, prior_a and prior_b (only one of the two loops runs).
    for s0 in range(split, last, CHUNK_S):
        offs_s = s0 + chunk
        member, mu_s, e_s, e_prior_s, total, top, out_mu = _per_subset_chunk(
            mu_ptr, lv_ptr, mask_ptr, row, offs_s, last, offs_m, offs_d, needed, valid_d, M,
            prior_mu, prior_l, stride_mb, stride_mm, stride_md, stride_vb, stride_vm, stride_vd,
            stride_kb, stride_ks, stride_km, HAS_PRIOR, ACC_DTYPE, BLOCK_M, MASK_ROW, ROW_BITS,
            X_ROWS)
        inv_total = _inverse_or_zero(total)
        g_mu, g_lv = _load_grads(gmu_ptr, glv_ptr, row, offs_s, d64, last, valid_d,
                                 stride_gb, stride_gs, stride_gd, stride_hb, stride_hs,
                                 stride_hd, ACC_DTYPE, ROW_BITS)
        # w_j and mu_j - out_mu. Each product is selected for the members of S, so that a NaN
        # (a NaN T from a NaN log-variance in S, a NaN upstream gradient of S, a mean of a
        # modality outside S) reaches only the gradients of S's members: 0 · NaN is NaN.
        weight = e_s * inv_total[:, None, :]
        spread = mu_s - out_mu[:, None, :]
        acc_a = _add_members(acc_a, member, weight * g_mu, X_ROWS, CHUNK_S)
        acc_b = _add_members(acc_b, member, weight * (g_lv - g_mu * spread), X_ROWS, CHUNK_S)
        if HAS_PRIOR:
            w_prior = (e_prior_s * inv_total)[:, None, :]
            prior_a += tl.sum(_over_chunk(w_prior * g_mu, X_ROWS), axis=1)
            prior_b += tl.sum(_over_chunk(
                w_prior * (g_lv - g_mu * (prior_mu[None, :] - out_mu)[:, None, :]), X_ROWS), axis=1)

    # One copy of the program's tiles (the X_ROWS rows are copies: their max is any of them)
    # and the sums over the chunk rows' partial sums.
    acc_a, acc_b = tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)               # [BM, BD]
    prior_a, prior_b = tl.sum(prior_a, axis=0), tl.sum(prior_b, axis=0)       # [BD]
    # Off the shared-shift path e may hold inf (a wide spread, shifted by 0): select, so that
    # 0 · inf cannot reach the result.
    if SHARED_SHIFT:
        e = tl.max(e, axis=0)
        e_prior = tl.max(e_prior, axis=0)
        centre = tl.max(centre, axis=0)
        mu_c = tl.max(_load_rows(mu_ptr, row, offs_m, offs_d, needed, valid_d, stride_mb,
                                 stride_mm, stride_md, ACC_DTYPE, ROW_BITS, X_ROWS),
                      axis=0) - centre[None, :]
        dmu = tl.where(narrow, e * acc_a, acc_a)
        dlv = tl.where(narrow, e * (acc_b - mu_c * acc_a), acc_b)
        dpmu = tl.where(narrow, e_prior * prior_a, prior_a)
        dplv = tl.where(narrow, e_prior * (prior_b - (prior_mu - centre) * prior_a), prior_b)
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


def _row_bits(M: int, block_m: int, itemsize: int) -> bool:
    """ROW_BITS: tiles laid out with a 16-byte vector of features of every modality in each
    thread's registers, lanes and warps along the features and then the chunk's subsets
    (:func:`mmfast.kernels._common.lane_rows`), membership read as bit sets. Each of the
    kernels' resident tiles (forward: e and e·mu; backward: e, e·mu and two sums) then takes
    ``BLOCK_M · 16 / itemsize`` float32 values a thread: at most 32 registers (M <= 8 in
    float32, M <= 4 in 16-bit types), or the kernels spill. More modalities, and float64 (twice
    the registers: its backward spilled at d = 64, sm_90, Triton 3.6), keep Triton's default
    layout."""
    return itemsize <= 4 and M <= block_m and block_m * (16 // itemsize) <= 32


def _blocks(S: int, M: int, D: int, itemsize: int = 4) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_D, CHUNK_S, num_warps: the [CHUNK_S, BLOCK_M, BLOCK_D] working set stays
    within a register budget on the GPU; the interpreter takes big tiles (few programs).

    ROW_BITS tiles (:func:`_row_bits`) put lanes and up to 4 warps along the features, one
    16-byte vector a thread (BLOCK_D up to 512), and at most 32 selection elements a thread:
    one subset a chunk at M = 8 (sm_90, Triton 3.6, float32, d = 512: two took as many
    instructions per output element, 15 more registers in the forward and spilled in the
    backward)."""
    interpreting = triton_interpreting()
    block_m = next_power_of_2(max(M, 1))
    if not interpreting and _row_bits(M, block_m, itemsize):
        block_d = min(next_power_of_2(D), 512)
        warps = max(1, min(4, block_d * itemsize // 512))
        feature_lanes = max(1, block_d * itemsize // 16)
        if feature_lanes >= 32 * warps:
            chunk = max(1, 1024 * warps // (block_m * block_d))
        else:
            # Lanes along the subsets (X_ROWS = CHUNK_S), one subset each: a thread holding
            # two would hold two copies of its tiles and sums (255 registers and spills at
            # M = 3, d = 17).
            chunk = 32 * warps // feature_lanes
        return block_m, block_d, min(next_power_of_2(max(S, 1)), chunk), warps
    budget = 1 << 16 if interpreting else 4096
    block_d = min(next_power_of_2(D), 4096 if interpreting else 128,
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
    itemsize = mu.element_size()
    block_m, block_d, chunk_s, warps = _blocks(S, M, D, itemsize)
    row_bits = _row_bits(M, block_m, itemsize)
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
        MASK_ROW=mask_row(mask_bytes, M, block_m, (skb, sks, skm)),
        ROW_BITS=row_bits, X_ROWS=lane_rows(block_d, chunk_s, warps, itemsize) if row_bits else 1,
        num_warps=warps,
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
    itemsize = mu.element_size()
    block_m, block_d, chunk_s, warps = _blocks(S, M, D, itemsize)
    row_bits = _row_bits(M, block_m, itemsize)
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
        MASK_ROW=mask_row(mask_bytes, M, block_m, (skb, sks, skm)),
        ROW_BITS=row_bits, X_ROWS=lane_rows(block_d, chunk_s, warps, itemsize) if row_bits else 1,
        num_warps=warps,
    )
    dmu, dlv = _sum_parts(dmu, mu.dtype), _sum_parts(dlv, mu.dtype)
    if has_prior:
        dpmu, dplv = _sum_parts(dpmu, mu.dtype), _sum_parts(dplv, mu.dtype)
    return dmu, dlv, dpmu, dplv
