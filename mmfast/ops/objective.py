"""``gaussian_terms``: the latent-space terms of the masked and mixture objectives, fused.

METHOD.md's per-sample weights need, for K importance samples,

* ``z_S = μ_S + σ_S ε_S`` with ``log q(z_S|x_S)`` and ``log p(z_S)`` (both objectives), and
* ``z = μ + σ ε`` with ``log q(z|x)`` and ``log q(z|x_S)`` (masked objective only),

with the stop-gradient rules of METHOD.md. One call produces all of them; on the triton backend
a fused kernel pair does, with no ``[K, B, d]`` intermediates besides the samples.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mmfast.ops import _validate as V
from mmfast.ops import reference as ref
from mmfast.ops._custom import define_op, eager_ok
from mmfast.ops.reference._common import acc_dtype


class GaussianTerms(NamedTuple):
    """Outputs of :func:`gaussian_terms`. ``*batch`` is ``[B]`` or ``[B, S]`` (a subset bank).

    z_s: ``[K, *batch, d]`` samples of q(z|x_S). log_q_s: ``[K, *batch]`` log q(z_S|x_S).
    log_p_s: ``[K, *batch]`` log p(z_S) under the prior. z_full: ``[K, B, d]`` samples of
    q(z|x) or None. log_q_full: ``[K, B]`` log q(z|x) or None. log_q_full_given_s:
    ``[K, *batch]`` log q(z|x_S) at the full sample, or None.
    """
    z_s: Tensor
    log_q_s: Tensor
    log_p_s: Tensor
    z_full: Tensor | None = None
    log_q_full: Tensor | None = None
    log_q_full_given_s: Tensor | None = None


def _subset_fake(mu_s, logvar_s, eps_s, prior_logits, prior_mu, prior_logvar, stl):
    acc = acc_dtype(eps_s.dtype)
    return (eps_s.new_empty(eps_s.shape), eps_s.new_empty(eps_s.shape[:-1], dtype=acc),
            eps_s.new_empty(eps_s.shape[:-1], dtype=acc))


def _full_fake(mu_f, logvar_f, eps_f, mu_s, logvar_s, stl):
    acc = acc_dtype(eps_f.dtype)
    K = eps_f.shape[0]
    return (eps_f.new_empty(eps_f.shape), eps_f.new_empty(eps_f.shape[:-1], dtype=acc),
            eps_f.new_empty((K, *mu_s.shape[:-1]), dtype=acc))


_subset_op = define_op(
    "gaussian_subset_terms",
    args="Tensor mu_s, Tensor logvar_s, Tensor eps_s, Tensor? prior_logits, Tensor? prior_mu, "
         "Tensor? prior_logvar, bool stl",
    differentiable=(0, 1, 2, 3, 4, 5), reference=ref.subset_terms,
    kernel_module="gaussian_terms", fake_out=_subset_fake, outputs=3)

_full_op = define_op(
    "gaussian_full_terms",
    args="Tensor mu_f, Tensor logvar_f, Tensor eps_f, Tensor mu_s, Tensor logvar_s, bool stl",
    differentiable=(0, 1, 2, 3, 4), reference=ref.full_terms,
    kernel_module="gaussian_terms", fake_out=_full_fake, outputs=3)


class _BothTerms(torch.autograd.Function):
    """The eager fast path of :func:`gaussian_terms` with both posteriors: the subset and full
    ops' implementations under one autograd node, their registered backwards (the backward ops'
    eager paths) in its backward. Against two nodes this saves the host a node and the
    accumulation of the two contributions to mu_s's and logvar_s's gradients, which it adds
    itself in the same order (``a + b``, as autograd's accumulation does). Values and gradients
    are those of the two custom ops."""

    @staticmethod
    def forward(ctx, mu_s, logvar_s, eps_s, prior_logits, prior_mu, prior_logvar, mu_f,
                logvar_f, eps_f, stl):
        ctx.save_for_backward(mu_s, logvar_s, eps_s, prior_logits, prior_mu, prior_logvar, mu_f,
                              logvar_f, eps_f)
        ctx.stl = stl
        ctx.set_materialize_grads(False)      # absent cotangents stay None: see backward
        return _both_impls(mu_s, logvar_s, eps_s, prior_logits, prior_mu, prior_logvar, mu_f,
                           logvar_f, eps_f, stl)

    @staticmethod
    def backward(ctx, *grads):
        """Each op's part as its own node would run it. A part none of whose outputs received
        a gradient is skipped: its inputs get None, as when its node never runs, rather than
        zeros (an optimizer with momentum or weight decay treats the two differently). A part
        that received one gets zeros for its other outputs' cotangents, as autograd makes them
        for a custom op."""
        mu_s, logvar_s, eps_s, prior_logits, prior_mu, prior_logvar, mu_f, logvar_f, eps_f = (
            ctx.saved_tensors)
        stl = ctx.stl
        dmu_s = dlv_s = deps_s = dmu_f = dlv_f = deps_f = None
        dprior = [None, None, None]
        if any(g is not None for g in grads[:3]):
            dmu_s, dlv_s, deps_s, *dprior_s = _subset_op.backward(
                *_or_zeros(grads[:3], _subset_fake, mu_s, logvar_s, eps_s, prior_logits,
                           prior_mu, prior_logvar, stl),
                mu_s, logvar_s, eps_s, prior_logits, prior_mu, prior_logvar, stl)
            if prior_logits is not None:
                dprior = dprior_s
        if any(g is not None for g in grads[3:]):
            dmu_f, dlv_f, deps_f, dmu_fs, dlv_fs = _full_op.backward(
                *_or_zeros(grads[3:], _full_fake, mu_f, logvar_f, eps_f, mu_s, logvar_s, stl),
                mu_f, logvar_f, eps_f, mu_s, logvar_s, stl)
            # The subset part's contribution first, as the two nodes' accumulation adds them.
            dmu_s = dmu_fs if dmu_s is None else dmu_s + dmu_fs
            dlv_s = dlv_fs if dlv_s is None else dlv_s + dlv_fs
        return (dmu_s, dlv_s, deps_s, *dprior, dmu_f, dlv_f, deps_f, None)


def _or_zeros(grads, fake, *args) -> tuple:
    """``grads`` with each None replaced by zeros shaped like the matching output of
    ``fake(*args)`` (an op's fake implementation), which only runs when one is None."""
    if all(g is not None for g in grads):
        return grads
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, fake(*args)))


def _both(subset, full, mu_s, logvar_s, eps_s, pl, pmu, plv, mu_f, logvar_f, eps_f, stl):
    """The six outputs of ``subset`` and ``full`` (the two ops, or their implementations)."""
    return (*subset(mu_s, logvar_s, eps_s, pl, pmu, plv, stl),
            *full(mu_f, logvar_f, eps_f, mu_s, logvar_s, stl))


def _both_impls(*args) -> tuple[Tensor, ...]:
    return _both(_subset_op.impl, _full_op.impl, *args)


def _both_terms(*args) -> tuple[Tensor, ...]:
    """Both ops' six outputs for ``args`` = (subset op's tensors, mu_f, logvar_f, eps_f, stl):
    in plain eager mode through :class:`_BothTerms` (the implementations alone without grad
    mode), else through the two custom ops."""
    if eager_ok(_subset_op.op, args):
        return _BothTerms.apply(*args) if torch.is_grad_enabled() else _both_impls(*args)
    return _both(_subset_op, _full_op, *args)


def _check_pair(op: str, names: tuple[str, str], pair, expected_shape=None) -> tuple[Tensor, Tensor]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(f"{op}: {names[0][:-3]} must be a pair (mu, logvar) of tensors")
    mu, logvar = pair
    V.tensor(op, names[0], mu, ndim=(2, 3), expected="[B, d] or [B, S, d]")
    V.tensor(op, names[1], logvar)
    V.same_shape(op, names[1], logvar, mu.shape)
    if expected_shape is not None:
        V.same_shape(op, names[0], mu, expected_shape)
    return mu, logvar


def gaussian_terms(posterior_s, eps_s: Tensor, posterior_full=None, eps_full: Tensor | None = None,
                   prior=None, stl: bool = True) -> GaussianTerms:
    """Samples and log-densities of both objectives' latent terms in one call.

    Args:
        posterior_s: ``(mu_s, logvar_s)`` of q(z|x_S), each ``[B, d]`` or ``[B, S, d]``.
        eps_s: ``[K, *batch, d]`` standard-normal noise for z_S.
        posterior_full: ``(mu, logvar)`` of q(z|x), each ``[B, d]``; None for the mixture
            objective (then ``z_full`` and its terms are None).
        eps_full: ``[K, B, d]`` noise for z (required with ``posterior_full``).
        prior: None for N(0, I), or ``(logits [C], mu [C, d], logvar [C, d])`` of a Gaussian
            mixture prior (differentiable).
        stl: sticking the landing: log q(z_S|x_S) and log q(z|x) see detached parameters.
    Returns:
        :class:`GaussianTerms`; log-densities in float32 (float64 for float64 inputs). In
        eager mode with ``posterior_full`` the six outputs come from one autograd node, like
        the outputs of any multi-output op: to differentiate some of them and then others,
        pass ``retain_graph=True`` to the first ``backward``/``grad``.
    """
    op = "gaussian_terms"
    mu_s, logvar_s = _check_pair(op, ("posterior_s[0]", "posterior_s[1]"), posterior_s)
    V.tensor(op, "eps_s", eps_s, ndim=mu_s.dim() + 1, expected=f"[K, *{list(mu_s.shape)}]")
    V.same_shape(op, "eps_s", eps_s, (eps_s.shape[0], *mu_s.shape),
                 f"[K, {', '.join(map(str, mu_s.shape))}]")
    V.same_dtype(op, mu_s=mu_s, logvar_s=logvar_s, eps_s=eps_s)
    tensors = dict(mu_s=mu_s, logvar_s=logvar_s, eps_s=eps_s)
    prior_logits = prior_mu = prior_logvar = None
    if prior is not None:
        if not (isinstance(prior, (tuple, list)) and len(prior) == 3):
            raise TypeError(f"{op}: prior must be None or (logits [C], mu [C, d], logvar [C, d])")
        prior_logits, prior_mu, prior_logvar = prior
        V.tensor(op, "prior logits", prior_logits, ndim=1, expected="[C]")
        C, d = prior_logits.shape[0], mu_s.shape[-1]
        for name, t in (("prior mu", prior_mu), ("prior logvar", prior_logvar)):
            V.tensor(op, name, t, ndim=2, expected=f"[{C}, {d}]")
            V.same_shape(op, name, t, (C, d))
        prior_logits, prior_mu, prior_logvar = (t.to(mu_s.dtype) for t in prior)
        tensors.update(prior_logits=prior_logits, prior_mu=prior_mu, prior_logvar=prior_logvar)
    if posterior_full is not None:
        B, d = mu_s.shape[0], mu_s.shape[-1]
        mu_f, logvar_f = _check_pair(op, ("posterior_full[0]", "posterior_full[1]"),
                                     posterior_full, (B, d))
        if eps_full is None:
            raise ValueError(f"{op}: eps_full [K, {B}, {d}] is required with posterior_full")
        V.tensor(op, "eps_full", eps_full, ndim=3, expected=f"[K, {B}, {d}]")
        V.same_shape(op, "eps_full", eps_full, (eps_s.shape[0], B, d))
        V.same_dtype(op, mu_s=mu_s, mu_full=mu_f, logvar_full=logvar_f, eps_full=eps_full)
        tensors.update(mu_full=mu_f, logvar_full=logvar_f, eps_full=eps_full)
    V.same_device(op, **tensors)
    if posterior_full is None:
        return GaussianTerms(*_subset_op(mu_s, logvar_s, eps_s, prior_logits, prior_mu,
                                         prior_logvar, bool(stl)))
    return GaussianTerms(*_both_terms(mu_s, logvar_s, eps_s, prior_logits, prior_mu,
                                      prior_logvar, mu_f, logvar_f, eps_full, bool(stl)))
