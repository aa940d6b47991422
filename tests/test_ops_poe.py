"""mmfast.ops.gaussian_poe on every backend, checked against the product of the experts'
densities (never against the closed precision-weighting formula):

* values: the log of the product of the expert densities (prior expert included) minus the log
  of the returned Gaussian's density is the same at several points, per latent dimension;
* values and gradients: the Gaussian of a product is recovered from the derivatives of the
  log of the product of densities (exact for a quadratic log-density: one Newton step from 0
  lands on the mean, minus the second derivative is the precision), differentiated by autograd.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from _opcases import (F64, MASK_KINDS, TOLERANCE, assert_unchanged, cases, close, cotangent_like,
                      generator, gradcheck, grads, make_mask, mask_bank, nan_test_mask, randn,
                      snapshot, uniform, unused_modalities)
from conftest import DEVICE, require_backend
from mmfast.ops import gaussian_poe

OP, MODULE = "gaussian_poe", "poe"

REFERENCE_SHAPES = [(B, M, d) for i, (M, d) in enumerate(
    (M, d) for M in (1, 2, 3, 5, 16) for d in (1, 17, 100)) for B in ((3, 7)[i % 2],)]
TRITON_SHAPES = [(3, 1, 17), (3, 3, 1), (5, 5, 17), (3, 16, 100)]
PRIORS = ("standard", "none", "pair_d", "pair_bd")


def make_prior(kind: str, B: int, d: int, gen, requires_grad: bool = False):
    """The ``prior`` argument and the prior expert as per-row tensors ``([B, d], [B, d])``."""
    if kind == "standard":
        zeros = torch.zeros(B, d, dtype=F64, device=DEVICE)
        return True, (zeros, zeros)
    if kind == "none":
        return False, None
    shape = (d,) if kind == "pair_d" else (B, d)
    mu_p = randn(*shape, gen=gen, requires_grad=requires_grad)
    logvar_p = randn(*shape, gen=gen, scale=0.5, requires_grad=requires_grad)
    return (mu_p, logvar_p), (mu_p.expand(B, d), logvar_p.expand(B, d))


def experts_of(mu, logvar, prior_rows, b, members):
    experts = [(mu[b, m], logvar[b, m]) for m in members]
    if prior_rows is not None:
        experts.append((prior_rows[0][b], prior_rows[1][b]))
    return experts


def log_product(experts, z: torch.Tensor) -> torch.Tensor:
    """``Σ_e log N(z; mu_e, exp(logvar_e))`` per dimension (torch.distributions); z ``[..., d]``."""
    return sum(Normal(m, torch.exp(0.5 * lv)).log_prob(z) for m, lv in experts)


def brute_poe(mu, logvar, mask, prior_rows):
    """The Gaussian proportional to the product of the experts of every subset, found from the
    first and second derivatives of the log of that product at z = 0; an empty product (no
    expert at all) gives mean 0, logvar 0 as the contract says. Differentiable (create_graph)."""
    B, M, d = mu.shape
    out_mu, out_logvar = [], []
    for b, subsets in enumerate(mask_bank(mask)):
        row_mu, row_logvar = [], []
        for members in subsets:
            experts = experts_of(mu, logvar, prior_rows, b, members)
            if not experts:
                row_mu.append(mu.new_zeros(d))
                row_logvar.append(mu.new_zeros(d))
                continue
            z = torch.zeros(d, dtype=F64, device=mu.device, requires_grad=True)
            # The log-density is separable over dimensions, so the gradient of the summed first
            # derivative is the Hessian's diagonal.
            first, = torch.autograd.grad(log_product(experts, z).sum(), z, create_graph=True)
            second, = torch.autograd.grad(first.sum(), z, create_graph=True)
            precision = -second
            row_mu.append(z + first / precision)
            row_logvar.append(-torch.log(precision))
        out_mu.append(torch.stack(row_mu))
        out_logvar.append(torch.stack(row_logvar))
    out_mu, out_logvar = torch.stack(out_mu), torch.stack(out_logvar)
    if mask.dim() == 2:
        out_mu, out_logvar = out_mu[:, 0], out_logvar[:, 0]
    return out_mu, out_logvar


def assert_density_ratio_constant(mu, logvar, mask, prior_rows, out_mu, out_logvar, rtol):
    """Product of the expert densities / returned density is constant over points, per dim."""
    t = torch.tensor([-2.0, -0.7, 0.0, 0.4, 1.5], dtype=F64, device=DEVICE)[:, None]
    bank_mu = out_mu if mask.dim() == 3 else out_mu.unsqueeze(1)
    bank_logvar = out_logvar if mask.dim() == 3 else out_logvar.unsqueeze(1)
    for b, subsets in enumerate(mask_bank(mask)):
        for s, members in enumerate(subsets):
            experts = experts_of(mu, logvar, prior_rows, b, members)
            if not experts:
                continue
            m_out, lv_out = bank_mu[b, s].to(F64), bank_logvar[b, s].to(F64)
            z = m_out + torch.exp(0.5 * lv_out) * t                       # [5, d], around the mean
            log_prod = log_product([(m.to(F64), lv.to(F64)) for m, lv in experts], z)
            ratio = log_prod - Normal(m_out, torch.exp(0.5 * lv_out)).log_prob(z)
            spread = (ratio - ratio[:1]).abs().amax(dim=0)
            # Rounding scales with the terms' size and, for a mean off by δ, the spread grows as
            # δ / σ_out: allow a relative error rtol in every quantity the points depend on.
            scale = (log_prod.abs().amax(dim=0) + ratio.abs().amax(dim=0) + lv_out.abs()
                     + 3.0 * m_out.abs() * torch.exp(-0.5 * lv_out))
            bound = rtol * (1.0 + scale)
            assert (spread <= bound).all(), f"row {b} subset {members}: spread {spread.max():.3g}"


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("backend,B,M,d", cases(REFERENCE_SHAPES, TRITON_SHAPES), indirect=["backend"])
def test_density_ratio_is_constant(backend, B, M, d, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(B * 1000 + M * 10 + d)
    mu = randn(B, M, d, gen=gen)
    logvar = randn(B, M, d, gen=gen, scale=1.5)
    mask = make_mask(kind, B, M, gen)
    for prior_kind in PRIORS:
        prior, prior_rows = make_prior(prior_kind, B, d, gen)
        out_mu, out_logvar = gaussian_poe(mu, logvar, mask, prior)
        assert out_mu.shape == out_logvar.shape == (*mask.shape[:-1], d)
        assert out_mu.dtype == out_logvar.dtype == F64
        assert_density_ratio_constant(mu, logvar, mask, prior_rows, out_mu, out_logvar, 1e-10)


@pytest.mark.parametrize("prior_kind", PRIORS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("backend,B,M,d", cases(REFERENCE_SHAPES[::2], TRITON_SHAPES[1:3]),
                         indirect=["backend"])
def test_values_and_gradients_match_brute_force(backend, B, M, d, kind, prior_kind):
    require_backend(backend, OP, MODULE)
    gen = generator(B * 1000 + M * 10 + d + 7)
    mu = randn(B, M, d, gen=gen, requires_grad=True)
    logvar = randn(B, M, d, gen=gen, scale=1.5, requires_grad=True)
    mask = make_mask(kind, B, M, gen)
    prior, prior_rows = make_prior(prior_kind, B, d, gen, requires_grad=True)
    leaves = [mu, logvar] + (list(prior) if isinstance(prior, tuple) else [])
    before = snapshot(*leaves, mask)

    out = gaussian_poe(mu, logvar, mask, prior)
    expected = brute_poe(mu, logvar, mask, prior_rows)
    close(out[0], expected[0])
    close(out[1], expected[1])

    cot = [cotangent_like(e, gen) for e in expected]
    for got, want in zip(grads(out, leaves, cot), grads(expected, leaves, cot)):
        close(got, want)
    assert_unchanged(before, (*leaves, mask))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("prior_kind", PRIORS)
def test_gradcheck(backend, prior_kind):
    require_backend(backend, OP, MODULE)
    gen = generator(11)
    B, M, d = 3, 3, 2
    mu = randn(B, M, d, gen=gen, requires_grad=True)
    logvar = randn(B, M, d, gen=gen, scale=0.5, requires_grad=True)
    mask = make_mask("shared_bank", B, M, gen)
    prior, _ = make_prior(prior_kind, B, d, gen, requires_grad=True)
    if isinstance(prior, tuple):
        fn = lambda m, lv, pm, plv: gaussian_poe(m, lv, mask, (pm, plv))  # noqa: E731
        inputs = (mu, logvar, *prior)
    else:
        fn = lambda m, lv: gaussian_poe(m, lv, mask, prior)  # noqa: E731
        inputs = (mu, logvar)
    assert gradcheck(fn, inputs, backend)
    assert gradcheck(lambda m, lv: gaussian_poe(m, lv, mask[:, 3], prior=False),
                                    (mu, logvar), backend)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_empty_subset_gives_prior_or_zeros(backend):
    require_backend(backend, OP, MODULE)
    gen = generator(12)
    B, M, d = 3, 5, 17
    mu = randn(B, M, d, gen=gen, requires_grad=True)
    logvar = randn(B, M, d, gen=gen, requires_grad=True)
    mask = torch.zeros(B, 2, M, dtype=torch.bool, device=DEVICE)
    zeros = torch.zeros(B, 2, d, dtype=F64, device=DEVICE)
    for prior in (False, True):
        out_mu, out_logvar = gaussian_poe(mu, logvar, mask, prior)
        assert torch.equal(out_mu, zeros) and torch.equal(out_logvar, zeros)
        g = grads((out_mu, out_logvar), (mu, logvar), [cotangent_like(zeros, gen)] * 2)
        assert all(torch.equal(t, torch.zeros_like(t)) for t in g)
    mu_p, logvar_p = randn(B, d, gen=gen), randn(B, d, gen=gen)
    out_mu, out_logvar = gaussian_poe(mu, logvar, mask, (mu_p, logvar_p))
    close(out_mu, mu_p.unsqueeze(1).expand(B, 2, d))
    close(out_logvar, logvar_p.unsqueeze(1).expand(B, 2, d))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_single_expert_without_prior_is_itself(backend):
    require_backend(backend, OP, MODULE)
    gen = generator(13)
    mu, logvar = randn(5, 1, 17, gen=gen), randn(5, 1, 17, gen=gen)
    mask = torch.ones(5, 1, dtype=torch.bool, device=DEVICE)
    out_mu, out_logvar = gaussian_poe(mu, logvar, mask, prior=False)
    close(out_mu, mu[:, 0])
    close(out_logvar, logvar[:, 0])


@pytest.mark.parametrize("backend,dtype", cases([torch.float64, torch.float32],
                                                [torch.float64, torch.float32]),
                         indirect=["backend"])
def test_extreme_log_variances_stay_finite_and_exact(backend, dtype):
    """logvar anywhere in [-30, 30]: precisions from 1e-13 to 1e13 in one product."""
    require_backend(backend, OP, MODULE)
    gen = generator(14)
    B, M, d = 3, 5, 17
    mu = randn(B, M, d, gen=gen, dtype=dtype)
    logvar = uniform(B, M, d, gen=gen, low=-30.0, high=30.0, dtype=dtype)
    logvar[0, :, :4] = torch.tensor([-30.0, 30.0, -30.0, 30.0], dtype=dtype)
    mask = make_mask("shared_bank", B, M, gen)
    rtol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]
    for prior in (True, False):
        prior_rows = make_prior("standard" if prior else "none", B, d, gen)[1]
        out_mu, out_logvar = gaussian_poe(mu, logvar, mask, prior)
        assert torch.isfinite(out_mu).all() and torch.isfinite(out_logvar).all()
        assert_density_ratio_constant(mu, logvar, mask, prior_rows, out_mu, out_logvar, rtol)
        exp_mu, exp_logvar = brute_poe(mu.to(F64), logvar.to(F64), mask, prior_rows)
        torch.testing.assert_close(out_mu.to(F64), exp_mu.detach(), rtol=rtol, atol=rtol)
        torch.testing.assert_close(out_logvar.to(F64), exp_logvar.detach(), rtol=rtol, atol=rtol * 30)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("kind", ["row", "shared_bank", "row_bank"])
def test_nan_in_unused_modalities_does_not_leak(backend, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(15)
    B, M, d = 5, 4, 17
    mask = nan_test_mask(kind, B, M, gen)
    unused = unused_modalities(mask).unsqueeze(-1)
    clean_mu, clean_logvar = randn(B, M, d, gen=gen), randn(B, M, d, gen=gen)
    mu = torch.where(unused, float("nan"), clean_mu).requires_grad_(True)
    logvar = torch.where(unused, float("nan"), clean_logvar).requires_grad_(True)
    for prior in (True, False):
        out = gaussian_poe(mu, logvar, mask, prior)
        prior_rows = make_prior("standard" if prior else "none", B, d, gen)[1]
        expected = [t.detach() for t in brute_poe(clean_mu, clean_logvar, mask, prior_rows)]
        assert all(torch.isfinite(t).all() for t in out)
        close(out[0], expected[0])
        close(out[1], expected[1])
        g = grads(out, (mu, logvar), [cotangent_like(t, gen) for t in out])
        for t in g:
            assert torch.isfinite(t).all()
            assert torch.equal(t[unused.expand_as(t)], torch.zeros_like(t[unused.expand_as(t)]))


@pytest.mark.parametrize("backend,dtype", cases(
    [torch.float32, torch.float16, torch.bfloat16],
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]),
    indirect=["backend"])
def test_low_precision_inputs(backend, dtype):
    require_backend(backend, OP, MODULE)
    gen = generator(16)
    B, M, d = 5, 16, 17
    mu = randn(B, M, d, gen=gen, dtype=dtype, requires_grad=True)
    logvar = randn(B, M, d, gen=gen, dtype=dtype, requires_grad=True)
    mask = make_mask("row_bank", B, M, gen)
    prior_rows = make_prior("standard", B, d, gen)[1]
    out = gaussian_poe(mu, logvar, mask)
    assert all(t.dtype == dtype and t.shape == (*mask.shape[:-1], d) for t in out)
    expected = brute_poe(mu.detach().to(F64), logvar.detach().to(F64), mask, prior_rows)
    close(out[0], expected[0].detach(), dtype)
    close(out[1], expected[1].detach(), dtype)
    g = grads(out, (mu, logvar), [cotangent_like(t, gen) for t in out])
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in g)
    mu64 = mu.detach().to(F64).requires_grad_(True)
    logvar64 = logvar.detach().to(F64).requires_grad_(True)
    cot = [cotangent_like(t, generator(17)) for t in out]
    got = grads(gaussian_poe(mu, logvar, mask), (mu, logvar), cot)
    want = grads(brute_poe(mu64, logvar64, mask, prior_rows), (mu64, logvar64), cot)
    for a, b in zip(got, want):
        rtol, atol = TOLERANCE[dtype]
        torch.testing.assert_close(a.to(F64), b, rtol=rtol, atol=4 * atol)
