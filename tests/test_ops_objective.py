"""mmfast.ops.gaussian_terms (custom ops gaussian_subset_terms / gaussian_full_terms) on every
backend against torch.distributions, including the stop-gradient ("sticking the landing")
rules of METHOD.md: with stl, log q(z_S|x_S) and log q(z|x) reach the encoders only through the
sample; log q(z|x_S) at the full sample and log p(z_S) are never detached."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from _opcases import (F64, TOLERANCE, assert_unchanged, cases, close, cotangent_like, generator,
                      gradcheck, grads, randn, snapshot)
from conftest import require_backend
from mmfast.ops import gaussian_terms

MODULE = "gaussian_terms"

# (K, B, S, d); S None gives [B, d] subset posteriors, else a [B, S, d] bank.
REFERENCE_SHAPES = [(K, B, S, d) for K in (1, 5) for B, S in ((3, None), (7, None), (3, 4), (5, 3))
                    for d in (1, 17, 100)]
TRITON_SHAPES = [(1, 3, None, 17), (5, 3, 4, 1), (2, 5, None, 100)]
OUTPUTS = ("z_s", "log_q_s", "log_p_s", "z_full", "log_q_full", "log_q_full_given_s")


def require(backend: str, with_full: bool) -> None:
    require_backend(backend, "gaussian_subset_terms", MODULE)
    if with_full:
        require_backend(backend, "gaussian_full_terms", MODULE)


def diag_normal(mu, logvar):
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def make_inputs(K, B, S, d, gen, prior_kind="standard", C=3, dtype=F64, with_full=True):
    """Leaves of every differentiable input and the keyword arguments of gaussian_terms."""
    batch = (B,) if S is None else (B, S)
    leaf = dict(
        mu_s=randn(*batch, d, gen=gen, dtype=dtype, requires_grad=True),
        logvar_s=randn(*batch, d, gen=gen, dtype=dtype, scale=0.5, requires_grad=True),
        eps_s=randn(K, *batch, d, gen=gen, dtype=dtype, requires_grad=True),
    )
    if with_full:
        leaf.update(mu_f=randn(B, d, gen=gen, dtype=dtype, requires_grad=True),
                    logvar_f=randn(B, d, gen=gen, dtype=dtype, scale=0.5, requires_grad=True),
                    eps_f=randn(K, B, d, gen=gen, dtype=dtype, requires_grad=True))
    if prior_kind == "mixture":
        leaf.update(logits=randn(C, gen=gen, dtype=dtype, requires_grad=True),
                    prior_mu=randn(C, d, gen=gen, dtype=dtype, scale=1.5, requires_grad=True),
                    prior_logvar=randn(C, d, gen=gen, dtype=dtype, scale=0.5, requires_grad=True))
    return leaf


def call(leaf, stl):
    prior = ((leaf["logits"], leaf["prior_mu"], leaf["prior_logvar"])
             if "logits" in leaf else None)
    full = (leaf["mu_f"], leaf["logvar_f"]) if "mu_f" in leaf else None
    return gaussian_terms((leaf["mu_s"], leaf["logvar_s"]), leaf["eps_s"], full,
                          leaf.get("eps_f"), prior=prior, stl=stl)


def brute_terms(leaf, stl):
    """METHOD.md's latent terms with torch.distributions; detach() spells out stl."""
    def maybe_detached(mu, logvar):
        return (mu.detach(), logvar.detach()) if stl else (mu, logvar)

    mu_s, logvar_s = leaf["mu_s"], leaf["logvar_s"]
    z_s = mu_s + torch.exp(0.5 * logvar_s) * leaf["eps_s"]
    log_q_s = diag_normal(*maybe_detached(mu_s, logvar_s)).log_prob(z_s)
    if "logits" in leaf:
        prior = MixtureSameFamily(Categorical(logits=leaf["logits"]),
                                  diag_normal(leaf["prior_mu"], leaf["prior_logvar"]))
    else:
        prior = Independent(Normal(torch.zeros_like(z_s), torch.ones_like(z_s)), 1)
    log_p_s = prior.log_prob(z_s)
    if "mu_f" not in leaf:
        return dict(z_s=z_s, log_q_s=log_q_s, log_p_s=log_p_s)
    mu_f, logvar_f = leaf["mu_f"], leaf["logvar_f"]
    z = mu_f + torch.exp(0.5 * logvar_f) * leaf["eps_f"]
    log_q_f = diag_normal(*maybe_detached(mu_f, logvar_f)).log_prob(z)
    z_at_s = z if mu_s.dim() == 2 else z.unsqueeze(2)          # one full sample, every subset
    log_q_fs = diag_normal(mu_s, logvar_s).log_prob(z_at_s)
    return dict(z_s=z_s, log_q_s=log_q_s, log_p_s=log_p_s, z_full=z, log_q_full=log_q_f,
                log_q_full_given_s=log_q_fs)


@pytest.mark.parametrize("stl", [True, False])
@pytest.mark.parametrize("prior_kind", ["standard", "mixture"])
@pytest.mark.parametrize("with_full", [True, False])
@pytest.mark.parametrize("backend,K,B,S,d", cases(REFERENCE_SHAPES, TRITON_SHAPES),
                         indirect=["backend"])
def test_values_and_gradients_match_brute_force(backend, K, B, S, d, with_full, prior_kind, stl):
    require(backend, with_full)
    gen = generator(K * 1000 + B * 100 + (S or 0) * 10 + d)
    leaf = make_inputs(K, B, S, d, gen, prior_kind, with_full=with_full)
    before = snapshot(*leaf.values())
    out = call(leaf, stl)
    expected = brute_terms(leaf, stl)
    batch = (B,) if S is None else (B, S)
    assert out.z_s.shape == (K, *batch, d) and out.log_q_s.shape == out.log_p_s.shape == (K, *batch)
    if with_full:
        assert out.z_full.shape == (K, B, d) and out.log_q_full.shape == (K, B)
        assert out.log_q_full_given_s.shape == (K, *batch)
    else:
        assert out.z_full is None and out.log_q_full is None and out.log_q_full_given_s is None
    names = list(expected)
    for name in names:
        assert getattr(out, name).dtype == F64
        close(getattr(out, name), expected[name])
    cot = [cotangent_like(expected[n], gen) for n in names]
    inputs = list(leaf.values())
    got = grads([getattr(out, n) for n in names], inputs, cot)
    want = grads([expected[n] for n in names], inputs, cot)
    for key, a, b in zip(leaf, got, want):
        assert (a is None) == (b is None), key
        if b is not None:
            close(a, b)
    assert_unchanged(before, leaf.values())


@pytest.mark.parametrize("stl", [True, False])
@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("used", ["log_p_s", "log_q_s", "log_q_full_given_s", "z_full"])
def test_gradients_through_one_output(backend, used, stl):
    """Outputs that receive no gradient (None cotangents in the backward op) count as zeros."""
    require(backend, True)
    gen = generator(51)
    leaf = make_inputs(3, 5, 2, 7, gen, "mixture")
    out = getattr(call(leaf, stl), used)
    expected = brute_terms(leaf, stl)[used]
    g = cotangent_like(expected, gen)
    for a, b in zip(grads([out], list(leaf.values()), [g]), grads([expected], list(leaf.values()), [g])):
        if b is None:
            assert a is None or torch.equal(a, torch.zeros_like(a))
        else:
            close(a, b)


@pytest.mark.parametrize("bank", [False, True])
@pytest.mark.parametrize("prior_kind", ["standard", "mixture"])
@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_gradcheck_without_stl(backend, prior_kind, bank):
    require(backend, True)
    gen = generator(52)
    leaf = make_inputs(2, 2, 2 if bank else None, 3, gen, prior_kind, C=2)
    keys = list(leaf)

    def fn(*tensors):
        out = call(dict(zip(keys, tensors)), stl=False)
        return tuple(t for t in out if t is not None)

    assert gradcheck(fn, tuple(leaf.values()), backend)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_stl_gradients_follow_only_the_sample_path(backend):
    """``z = mu + σ ε``: through the sample alone, ∂ log q(z; mu, σ) / ∂mu = -ε / σ and
    ∂ / ∂logvar = -ε² / 2; with the parameter path too (stl off) they are 0 and -1/2."""
    require(backend, True)
    gen = generator(53)
    K, B, S, d = 4, 3, 2, 5
    leaf = make_inputs(K, B, S, d, gen)
    sigma_s = torch.exp(0.5 * leaf["logvar_s"].detach())
    sigma_f = torch.exp(0.5 * leaf["logvar_f"].detach())
    eps_s, eps_f = leaf["eps_s"].detach(), leaf["eps_f"].detach()
    for stl in (True, False):
        out = call(leaf, stl)
        # The outputs may share one autograd node (the eager path): keep it for the next grads.
        g_mu_s, g_lv_s = torch.autograd.grad(out.log_q_s.sum(), (leaf["mu_s"], leaf["logvar_s"]),
                                             retain_graph=True)
        g_mu_f, g_lv_f = torch.autograd.grad(out.log_q_full.sum(), (leaf["mu_f"], leaf["logvar_f"]),
                                             retain_graph=True)
        if stl:
            close(g_mu_s, (-eps_s / sigma_s).sum(0))
            close(g_lv_s, (-0.5 * eps_s ** 2).sum(0))
            close(g_mu_f, (-eps_f / sigma_f).sum(0))
            close(g_lv_f, (-0.5 * eps_f ** 2).sum(0))
        else:
            close(g_mu_s, torch.zeros_like(g_mu_s))
            close(g_lv_s, torch.full_like(g_lv_s, -0.5 * K))
            close(g_mu_f, torch.zeros_like(g_mu_f))
            close(g_lv_f, torch.full_like(g_lv_f, -0.5 * K))
        # log q(z|x_S) at the full sample keeps its parameter path whatever stl says.
        z = (leaf["mu_f"] + sigma_f * eps_f).detach().unsqueeze(2)            # [K, B, 1, d]
        g_mu, = torch.autograd.grad(out.log_q_full_given_s.sum(), leaf["mu_s"])
        close(g_mu, ((z - leaf["mu_s"].detach()) / sigma_s ** 2).sum(0))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("C", [1, 64])
def test_mixture_prior_component_counts(backend, C):
    require(backend, False)
    gen = generator(54 + C)
    leaf = make_inputs(3, 5, None, 17, gen, "mixture", C=C, with_full=False)
    out = call(leaf, stl=True)
    expected = brute_terms(leaf, stl=True)
    close(out.log_p_s, expected["log_p_s"])
    g = cotangent_like(out.log_p_s, gen)
    keys = ["logits", "prior_mu", "prior_logvar", "mu_s"]
    for a, b in zip(grads([out.log_p_s], [leaf[k] for k in keys], [g]),
                    grads([expected["log_p_s"]], [leaf[k] for k in keys], [g])):
        close(a, b)


@pytest.mark.parametrize("backend,dtype", cases(
    [torch.float32, torch.float16, torch.bfloat16],
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]),
    indirect=["backend"])
@pytest.mark.parametrize("prior_kind", ["standard", "mixture"])
def test_low_precision_inputs(backend, dtype, prior_kind):
    require(backend, True)
    gen = generator(55)
    leaf = make_inputs(3, 5, 2, 17, gen, prior_kind, dtype=dtype)
    out = call(leaf, stl=True)
    wide = {k: v.detach().to(F64).requires_grad_(True) for k, v in leaf.items()}
    expected = brute_terms(wide, stl=True)
    for name in expected:
        t = getattr(out, name)
        assert t.dtype == (dtype if name.startswith("z") else torch.float32), name
        close(t, expected[name], dtype, scale=10.0)
    g = cotangent_like(out.log_p_s, gen)
    (got,) = torch.autograd.grad(out.log_p_s, leaf["mu_s"], g)
    (want,) = torch.autograd.grad(expected["log_p_s"], wide["mu_s"], g.to(F64))
    assert got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.to(F64), want, rtol=rtol, atol=10 * atol)
