"""Observation log-likelihoods summed over the event: bernoulli, normal, Laplace, categorical.

Parameters arrive as ``[K, B, *event]`` (K decoded latent samples), data as ``[B, *event]``
(broadcast over K); the launchers view the event axes as one axis of N elements (a copy only
when the strides do not allow a view) and every kernel reads its tensors by strides, so a
stride-0 ``log_scale`` (a scalar or per-event scale expanded to loc's shape) is never
materialised. Per (k, b) row, with ``l`` the logits and ``s = min_scale + exp(log_scale)``:

    bernoulli  Σ_n x·l − softplus(l)                softplus(l) = max(l, 0) + log(1 + exp(−|l|))
    normal     Σ_n −r²/2 − log s − log(2π)/2        r = (x − loc) / s
    laplace    Σ_n −|x − loc|/s − log(2s)
    categorical Σ_e l[e, t_e] − logsumexp_c l[e, c]  (online over chunks of classes)

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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.backend import triton_interpreting
from mmfast.kernels._common import (LOG_2PI_HI, LOG_2PI_LO, acc_dtype, cdiv, element_budget,
                                    next_power_of_2, num_warps, split_float, torch_acc_dtype)

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
def _categorical_forward_kernel(
    l_ptr, t_ptr, out_ptr, B, E, C,
    stride_lk, stride_lb, stride_le, stride_lc, stride_tb, stride_te,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (k, b): BLOCK_E positions at a time, classes in BLOCK_C chunks with an
    online log-sum-exp (running max and rescaled sum)."""
    row = tl.program_id(0).to(tl.int64)
    k = row // B
    b = row % B
    base = l_ptr + k * stride_lk + b * stride_lb
    acc = tl.zeros((BLOCK_E,), dtype=ACC)
    for e0 in range(0, E, BLOCK_E):
        offs_e = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
        valid_e = offs_e < E
        top = tl.full((BLOCK_E,), float("-inf"), ACC)
        total = tl.zeros((BLOCK_E,), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            valid = valid_e[:, None] & (offs_c < C)[None, :]
            l = tl.load(base + offs_e[:, None] * stride_le + offs_c[None, :] * stride_lc,
                        mask=valid, other=float("-inf")).to(ACC)
            new_top = tl.maximum(top, tl.max(l, axis=1))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            total = total * tl.exp(top - shift) + tl.sum(tl.exp(l - shift[:, None]), axis=1)
            top = new_top
        target = tl.load(t_ptr + b * stride_tb + offs_e * stride_te, mask=valid_e, other=0)
        in_range = valid_e & (target >= 0) & (target < C)
        # An out-of-range class index gives NaN rather than a silently wrong value.
        picked = tl.load(base + offs_e * stride_le + target * stride_lc, mask=in_range,
                         other=float("nan")).to(ACC)
        acc += tl.where(valid_e, picked - top - tl.log(tl.where(valid_e, total, 1.0)), 0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def _categorical_backward_kernel(
    g_ptr, l_ptr, t_ptr, dl_ptr, B, E, C,
    stride_gk, stride_gb,
    stride_lk, stride_lb, stride_le, stride_lc, stride_tb, stride_te,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per (k, b, block of positions): the log-sum-exp of each position again, then
    ``g (onehot − softmax)`` chunk by chunk into the contiguous ``[K, B, E, C]`` gradient."""
    row = tl.program_id(0).to(tl.int64)
    k = row // B
    b = row % B
    offs_e = (tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    valid_e = offs_e < E
    base = l_ptr + k * stride_lk + b * stride_lb
    g = tl.load(g_ptr + k * stride_gk + b * stride_gb).to(ACC)
    target = tl.load(t_ptr + b * stride_tb + offs_e * stride_te, mask=valid_e, other=-1)
    top = tl.full((BLOCK_E,), float("-inf"), ACC)
    total = tl.zeros((BLOCK_E,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        valid = valid_e[:, None] & (offs_c < C)[None, :]
        l = tl.load(base + offs_e[:, None] * stride_le + offs_c[None, :] * stride_lc,
                    mask=valid, other=float("-inf")).to(ACC)
        new_top = tl.maximum(top, tl.max(l, axis=1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(l - shift[:, None]), axis=1)
        top = new_top
    lse = top + tl.log(tl.where(valid_e, total, 1.0))
    out_row = dl_ptr + row * E * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        valid = valid_e[:, None] & (offs_c < C)[None, :]
        l = tl.load(base + offs_e[:, None] * stride_le + offs_c[None, :] * stride_lc,
                    mask=valid, other=0.0).to(ACC)
        onehot = tl.where(offs_c[None, :] == target[:, None], 1.0, 0.0)
        dl = g * (onehot - tl.exp(l - lse[:, None]))
        tl.store(out_row + offs_e[:, None] * C + offs_c[None, :], dl.to(dl_ptr.dtype.element_ty),
                 mask=valid)


# ------------------------------------------------------------------------------- launchers

def _flat(t: torch.Tensor, lead: int) -> torch.Tensor:
    """View ``[*lead_axes, *event]`` as ``[*lead_axes, N]`` (a copy only if strides forbid)."""
    return t.reshape(*t.shape[:lead], -1)


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
    dp = torch.empty(params.shape, dtype=params.dtype, device=params.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
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


def _categorical_blocks(E: int, C: int) -> tuple[int, int]:
    budget = element_budget()
    block_c = min(next_power_of_2(C), 1024, budget)
    block_e = min(next_power_of_2(max(E, 1)), max(1, budget // block_c))
    return block_e, block_c


def categorical_log_prob_forward(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits ``[K, B, *event, C]``, target int64 ``[B, *event]`` -> ``[K, B]``."""
    K, B, C = logits.shape[0], logits.shape[1], logits.shape[-1]
    out = torch.empty((K, B), dtype=torch_acc_dtype(logits.dtype), device=logits.device)
    l = logits.reshape(K, B, -1, C)
    E = l.shape[2]
    if out.numel() == 0:
        return out
    if E == 0:
        return out.zero_()
    t = target.reshape(B, -1)
    block_e, block_c = _categorical_blocks(E, C)
    _categorical_forward_kernel[(K * B,)](
        l, t, out, B, E, C, *l.stride(), *t.stride(),
        ACC=acc_dtype(logits.dtype), BLOCK_E=block_e, BLOCK_C=block_c,
        num_warps=num_warps(block_e * block_c))
    return out


def categorical_log_prob_backward(grad: torch.Tensor | None, logits: torch.Tensor,
                                  target: torch.Tensor) -> tuple[torch.Tensor]:
    """grad ``[K, B]`` -> ``(dlogits,)``: ``[K, B, *event, C]``, contiguous (a one-element
    tuple: one gradient per differentiable input)."""
    K, B, C = logits.shape[0], logits.shape[1], logits.shape[-1]
    dl = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    l = logits.reshape(K, B, -1, C)
    E = l.shape[2]
    if grad is None or dl.numel() == 0:
        return (dl.zero_(),)
    t = target.reshape(B, -1)
    block_e, block_c = _categorical_blocks(E, C)
    grid = (K * B, cdiv(E, block_e))
    _categorical_backward_kernel[grid](
        grad, l, t, dl, B, E, C, *grad.stride(), *l.stride(), *t.stride(),
        ACC=acc_dtype(logits.dtype), BLOCK_E=block_e, BLOCK_C=block_c,
        num_warps=num_warps(block_e * block_c))
    return (dl,)
