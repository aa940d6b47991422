"""``gaussian_poe``: precision-weighted product of Gaussian experts over each subset."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmfast.backend import select_kernel
from mmfast.ops import _validate as V
from mmfast.ops import reference as ref
from mmfast.ops._custom import absent, eager_fast_path, fresh, reference_vjp

_KERNEL = "poe"


def _forward_impl(mu: Tensor, logvar: Tensor, mask: Tensor, prior_mu: Optional[Tensor],
                  prior_logvar: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    kernel = select_kernel("gaussian_poe", _KERNEL, mu.device)
    if kernel is not None:
        return kernel.gaussian_poe_forward(mu, logvar, mask, prior_mu, prior_logvar)
    out_mu, out_logvar = ref.gaussian_poe(mu, logvar, mask, prior_mu, prior_logvar)
    return fresh(out_mu.contiguous(), mu, logvar), fresh(out_logvar.contiguous(), mu, logvar)


_forward = torch.library.custom_op("mmfast::gaussian_poe", mutates_args=())(_forward_impl)


@_forward.register_fake
def _(mu, logvar, mask, prior_mu, prior_logvar):
    shape = (*mask.shape[:-1], mu.shape[-1])
    return mu.new_empty(shape), mu.new_empty(shape)


def _backward_impl(grad_mu: Tensor, grad_logvar: Tensor, mu: Tensor, logvar: Tensor,
                   mask: Tensor, prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor],
                   out_mu: Tensor, out_logvar: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (mu, logvar, prior_mu, prior_logvar); an absent prior's are empty."""
    kernel = select_kernel("gaussian_poe", _KERNEL, mu.device)
    if kernel is not None:
        return kernel.gaussian_poe_backward(grad_mu, grad_logvar, mu, logvar, mask, prior_mu, prior_logvar,
                               out_mu, out_logvar)

    def f(mu_, logvar_, prior_mu_, prior_logvar_):
        return ref.gaussian_poe(mu_, logvar_, mask, prior_mu_, prior_logvar_)

    g = reference_vjp(f, (mu, logvar, prior_mu, prior_logvar), (grad_mu, grad_logvar))
    return tuple(absent(mu) if t is None else t for t in g)


_backward = torch.library.custom_op("mmfast::gaussian_poe_backward",
                                    mutates_args=())(_backward_impl)


@_backward.register_fake
def _(grad_mu, grad_logvar, mu, logvar, mask, prior_mu, prior_logvar, out_mu, out_logvar):
    like = (lambda t: absent(mu) if t is None else t.new_empty(t.shape))
    return mu.new_empty(mu.shape), logvar.new_empty(logvar.shape), like(prior_mu), like(prior_logvar)


def _setup_context(ctx, inputs, output):
    mu, logvar, mask, prior_mu, prior_logvar = inputs
    ctx.save_for_backward(mu, logvar, mask, prior_mu, prior_logvar, *output)


def _autograd(ctx, grad_mu, grad_logvar):
    mu, logvar, mask, prior_mu, prior_logvar, out_mu, out_logvar = ctx.saved_tensors
    g = _backward_call(grad_mu, grad_logvar, mu, logvar, mask, prior_mu, prior_logvar,
                  out_mu, out_logvar)
    no_prior = prior_mu is None
    return g[0], g[1], None, None if no_prior else g[2], None if no_prior else g[3]


_forward.register_autograd(_autograd, setup_context=_setup_context)
_forward_call = eager_fast_path(_forward, _forward_impl, _setup_context, _autograd)
_backward_call = eager_fast_path(_backward, _backward_impl)


def _prior_pair(op: str, prior, mu: Tensor) -> tuple[Tensor | None, Tensor | None]:
    B, _, d = mu.shape
    if prior is True:
        zero = mu.new_zeros(()).expand(B, d)  # N(0, I), read by strides, never materialised
        return zero, zero
    if prior is False or prior is None:
        return None, None
    if not (isinstance(prior, (tuple, list)) and len(prior) == 2):
        raise TypeError(f"{op}: prior must be True, False or a pair (mu_p, logvar_p), "
                        f"got {type(prior).__name__}")
    out = []
    for name, t in zip(("prior[0] (mu_p)", "prior[1] (logvar_p)"), prior):
        V.tensor(op, name, t, ndim=(1, 2), expected=f"[{d}] or [{B}, {d}]")
        if tuple(t.shape) not in ((d,), (B, d)):
            raise ValueError(f"{op}: {name} has shape {list(t.shape)}; expected [{d}] or [{B}, {d}]")
        out.append(t.to(mu.dtype).expand(B, d))
    return out[0], out[1]


def gaussian_poe(mu: Tensor, logvar: Tensor, mask: Tensor, prior=True) -> tuple[Tensor, Tensor]:
    """Product of the Gaussian experts ``N(mu_m, exp(logvar_m))`` of the modalities in each subset.

    precision ``λ = Σ_{m∈S} exp(-logvar_m) (+ prior precision)``, mean
    ``(Σ_{m∈S} mu_m exp(-logvar_m) (+ prior term)) / λ``, logvar ``-log λ``; stable for logvar in
    [-30, 30]. An empty subset gives the prior, or mu = 0, logvar = 0 without one. The weighted
    sum of the means is formed before the division, so means above the dtype's largest value
    over the number of experts in a subset (~4e37 for 8 float32 experts) may overflow to inf.
    A NaN or inf input reaches only the subsets (and the gradients of their members) that
    hold it.

    Args:
        mu, logvar: ``[B, M, d]``.
        mask: bool ``[B, M]`` or ``[B, S, M]``.
        prior: ``True`` (an N(0, I) expert always in), ``False`` (none), or a pair
            ``(mu_p, logvar_p)`` each ``[d]`` or ``[B, d]`` (differentiable).
    Returns:
        ``(mu, logvar)``, each ``[B, d]`` or ``[B, S, d]`` in ``mu.dtype``.
    """
    op = "gaussian_poe"
    V.tensor(op, "mu", mu, ndim=3, expected="[B, M, d]")
    V.tensor(op, "logvar", logvar, ndim=3, expected=f"{list(mu.shape)} like mu")
    V.same_shape(op, "logvar", logvar, mu.shape)
    V.same_dtype(op, mu=mu, logvar=logvar)
    V.mask(op, "mask", mask, mu.shape[0], mu.shape[1])
    prior_mu, prior_logvar = _prior_pair(op, prior, mu)
    V.same_device(op, mu=mu, logvar=logvar, mask=mask, prior_mu=prior_mu, prior_logvar=prior_logvar)
    return _forward_call(mu, logvar, mask, prior_mu, prior_logvar)
