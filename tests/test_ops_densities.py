"""mmfast.ops.gaussian_log_prob and mixture_log_prob on every backend against
torch.distributions (values, gradients under random upstream gradients, broadcasting, dtypes)."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from _opcases import (F64, assert_unchanged, cases, close, cotangent_like, generator, gradcheck,
                      grads, randn, snapshot, uniform)
from conftest import require_backend
from mmfast.ops import gaussian_log_prob, mixture_log_prob

MODULE = "densities"

# (K, batch, d)
REFERENCE_SHAPES = [(K, batch, d) for K in (1, 5) for batch in ((7,), (3, 5)) for d in (1, 17, 100)]
TRITON_SHAPES = [(1, (3,), 17), (5, (3, 5), 1), (2, (3,), 100)]


def diag_normal(mu, logvar):
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def mixture(logits, mu, logvar):
    return MixtureSameFamily(Categorical(logits=logits), diag_normal(mu, logvar))


def log_out_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


# --------------------------------------------------------------------------- gaussian_log_prob

@pytest.mark.parametrize("backend,K,batch,d", cases(REFERENCE_SHAPES, TRITON_SHAPES),
                         indirect=["backend"])
def test_gaussian_matches_torch_distributions(backend, K, batch, d):
    require_backend(backend, "gaussian_log_prob", MODULE)
    gen = generator(K * 100 + d + len(batch))
    z = randn(K, *batch, d, gen=gen, scale=1.5, requires_grad=True)
    mu = randn(*batch, d, gen=gen, requires_grad=True)
    logvar = randn(*batch, d, gen=gen, scale=0.7, requires_grad=True)
    before = snapshot(z, mu, logvar)
    out = gaussian_log_prob(z, mu, logvar)
    assert out.shape == (K, *batch) and out.dtype == F64
    expected = diag_normal(mu, logvar).log_prob(z)
    close(out, expected)
    g = cotangent_like(out, gen)
    for got, want in zip(grads([out], [z, mu, logvar], [g]), grads([expected], [z, mu, logvar], [g])):
        close(got, want)
    assert_unchanged(before, (z, mu, logvar))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("z_shape,mu_shape", [
    ((4, 3, 1, 6), (3, 5, 6)),    # one full sample scored under every subset's q
    ((4, 3, 5, 6), (3, 1, 6)),    # one q for every subset
    ((4, 3, 6), (6,)),            # parameters shared by the batch
])
def test_gaussian_broadcasting(backend, z_shape, mu_shape):
    require_backend(backend, "gaussian_log_prob", MODULE)
    gen = generator(31)
    z = randn(*z_shape, gen=gen, requires_grad=True)
    mu = randn(*mu_shape, gen=gen, requires_grad=True)
    logvar = randn(*mu_shape, gen=gen, scale=0.5, requires_grad=True)
    out = gaussian_log_prob(z, mu, logvar)
    expected = diag_normal(mu, logvar).log_prob(z)
    assert out.shape == expected.shape
    close(out, expected)
    g = cotangent_like(out, gen)
    for got, want in zip(grads([out], [z, mu, logvar], [g]), grads([expected], [z, mu, logvar], [g])):
        assert got.shape == want.shape
        close(got, want)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_gaussian_gradcheck(backend):
    require_backend(backend, "gaussian_log_prob", "densities")
    gen = generator(32)
    z = randn(2, 3, 4, gen=gen, requires_grad=True)
    mu = randn(3, 4, gen=gen, requires_grad=True)
    logvar = randn(3, 4, gen=gen, scale=0.5, requires_grad=True)
    assert gradcheck(gaussian_log_prob, (z, mu, logvar), backend)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_gaussian_extreme_values(backend):
    require_backend(backend, "gaussian_log_prob", MODULE)
    gen = generator(33)
    z = randn(3, 4, 17, gen=gen, scale=50.0)
    mu = randn(4, 17, gen=gen)
    logvar = uniform(4, 17, gen=gen, low=-20.0, high=20.0)
    out = gaussian_log_prob(z, mu, logvar)
    expected = diag_normal(mu, logvar).log_prob(z)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-8)


# ---------------------------------------------------------------------------- mixture_log_prob

MIXTURE_REFERENCE = [(K, batch, d, C) for (K, batch, d) in REFERENCE_SHAPES for C in (1, 3, 64)
                     if C != 64 or d != 100]
MIXTURE_TRITON = [(1, (3,), 17, 3), (5, (3, 5), 1, 64), (2, (3,), 100, 1)]


@pytest.mark.parametrize("backend,K,batch,d,C", cases(MIXTURE_REFERENCE, MIXTURE_TRITON),
                         indirect=["backend"])
def test_mixture_matches_torch_distributions(backend, K, batch, d, C):
    require_backend(backend, "mixture_log_prob", MODULE)
    gen = generator(K * 1000 + d * 10 + C + len(batch))
    z = randn(K, *batch, d, gen=gen, scale=1.5, requires_grad=True)
    logits = randn(C, gen=gen, scale=2.0, requires_grad=True)
    mu = randn(C, d, gen=gen, requires_grad=True)
    logvar = randn(C, d, gen=gen, scale=0.5, requires_grad=True)
    leaves = [z, logits, mu, logvar]
    before = snapshot(*leaves)
    out = mixture_log_prob(z, logits, mu, logvar)
    assert out.shape == (K, *batch) and out.dtype == F64
    # MixtureSameFamily expects the component axis just before the event axis.
    expected = mixture(logits, mu, logvar).log_prob(z)
    close(out, expected)
    g = cotangent_like(out, gen)
    for got, want in zip(grads([out], leaves, [g]), grads([expected], leaves, [g])):
        close(got, want)
    assert_unchanged(before, leaves)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_mixture_single_component_is_gaussian(backend):
    require_backend(backend, "mixture_log_prob", MODULE)
    gen = generator(34)
    z = randn(3, 5, 7, gen=gen)
    mu, logvar = randn(1, 7, gen=gen), randn(1, 7, gen=gen)
    logits = randn(1, gen=gen, scale=5.0)
    close(mixture_log_prob(z, logits, mu, logvar), diag_normal(mu[0], logvar[0]).log_prob(z))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_mixture_gradcheck(backend):
    require_backend(backend, "mixture_log_prob", MODULE)
    gen = generator(35)
    z = randn(2, 3, 4, gen=gen, requires_grad=True)
    logits = randn(3, gen=gen, requires_grad=True)
    mu = randn(3, 4, gen=gen, requires_grad=True)
    logvar = randn(3, 4, gen=gen, scale=0.5, requires_grad=True)
    assert gradcheck(mixture_log_prob, (z, logits, mu, logvar), backend)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_mixture_far_from_every_component(backend):
    """log-densities of -1e4 and below: a log-sum-exp, never exp of them."""
    require_backend(backend, "mixture_log_prob", MODULE)
    gen = generator(36)
    z = randn(2, 3, 8, gen=gen, scale=0.1, shift=40.0, requires_grad=True)
    logits = torch.tensor([100.0, -100.0, 0.0, 3.0], dtype=F64).requires_grad_(True)
    mu = randn(4, 8, gen=gen, requires_grad=True)
    logvar = uniform(4, 8, gen=gen, low=-3.0, high=0.0, requires_grad=True)
    out = mixture_log_prob(z, logits, mu, logvar)
    expected = mixture(logits, mu, logvar).log_prob(z)
    assert torch.isfinite(out).all() and (out < -1e3).all()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-8)
    g = cotangent_like(out, gen)
    for got, want in zip(grads([out], [z, logits, mu, logvar], [g]),
                         grads([expected], [z, logits, mu, logvar], [g])):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("backend,dtype", cases(
    [torch.float32, torch.float16, torch.bfloat16],
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]),
    indirect=["backend"])
@pytest.mark.parametrize("op", ["gaussian_log_prob", "mixture_log_prob"])
def test_low_precision_inputs(backend, dtype, op):
    require_backend(backend, op, MODULE)
    gen = generator(37)
    z = randn(3, 5, 17, gen=gen, dtype=dtype, requires_grad=True)
    if op == "gaussian_log_prob":
        params = [randn(5, 17, gen=gen, dtype=dtype), randn(5, 17, gen=gen, dtype=dtype, scale=0.3)]
        out = gaussian_log_prob(z, *params)
        dist = diag_normal(*[p.to(F64) for p in params])
    else:
        params = [randn(3, gen=gen, dtype=dtype), randn(3, 17, gen=gen, dtype=dtype),
                  randn(3, 17, gen=gen, dtype=dtype, scale=0.3)]
        out = mixture_log_prob(z, *params)
        dist = mixture(*[p.to(F64) for p in params])
    assert out.dtype == log_out_dtype(dtype) and out.shape == (3, 5)
    z64 = z.detach().to(F64).requires_grad_(True)
    expected = dist.log_prob(z64)
    # Sums of 17 terms of size ~1: absolute error from rounding the inputs, none from the sum.
    close(out, expected, dtype, scale=10.0)
    g = cotangent_like(out, gen)
    (got,) = torch.autograd.grad(out, z, g)
    (want,) = torch.autograd.grad(expected, z64, g.to(F64))
    assert got.dtype == dtype
    close(got, want, dtype, scale=10.0)
