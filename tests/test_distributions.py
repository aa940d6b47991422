"""Distributions and priors against torch.distributions and sample statistics."""
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import mmfast as mf
from mmfast.distributions import DiagGaussian, DiagGaussianMixture

DT = torch.float64


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    yield


def _torch_mixture(logits, mu, logvar):
    return MixtureSameFamily(Categorical(logits=logits),
                             Independent(Normal(mu, torch.exp(0.5 * logvar)), 1))


def test_diag_gaussian_shapes_log_prob_and_reparameterisation():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, 5, generator=gen, dtype=DT, requires_grad=True)
    logvar = torch.randn(3, 4, 5, generator=gen, dtype=DT, requires_grad=True)
    q = DiagGaussian(mu, logvar)
    assert q.batch_shape == (3, 4) and q.event_shape == (5,)
    z = q.rsample(7)
    assert z.shape == (7, 3, 4, 5)
    expected = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1).log_prob(z)
    torch.testing.assert_close(q.log_prob(z), expected)
    # several sample axes and a broadcast batch axis
    z2 = torch.randn(2, 6, 3, 1, 5, dtype=DT)
    torch.testing.assert_close(q.log_prob(z2), Independent(Normal(mu, torch.exp(0.5 * logvar)), 1).log_prob(z2))
    # gradient through the sample: dz/dmu = 1, dz/dlogvar = (z - mu) / 2
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.full_like(mu, 7.0))
    torch.testing.assert_close(logvar.grad, (0.5 * (z - mu)).sum(0).detach())
    assert q[:, 1].batch_shape == (3,)
    torch.testing.assert_close(q.entropy(), Independent(Normal(mu, torch.exp(0.5 * logvar)), 1).entropy())


def test_mixture_log_prob_matches_torch_and_handles_switched_off_components():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=gen, dtype=DT)
    logits[0, 1] = float("-inf")
    mu, logvar = torch.randn(4, 3, 2, generator=gen, dtype=DT), torch.randn(4, 3, 2, generator=gen, dtype=DT)
    q = DiagGaussianMixture(logits, mu, logvar)
    z = torch.randn(6, 4, 2, generator=gen, dtype=DT)
    torch.testing.assert_close(q.log_prob(z), _torch_mixture(logits, mu, logvar).log_prob(z))
    w = torch.softmax(logits, -1)
    torch.testing.assert_close(q.mean, (w[..., None] * mu).sum(-2))


def test_mixture_samples_follow_the_weights_and_moments():
    torch.manual_seed(2)
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [1.0, 1e-30, 1e-30]], dtype=DT))
    mu = torch.tensor([[[-6.0], [0.0], [6.0]], [[1.0], [-9.0], [9.0]]], dtype=DT)
    logvar = torch.zeros(2, 3, 1, dtype=DT) + math.log(0.25)
    q = DiagGaussianMixture(logits, mu, logvar)
    n = 20000
    z = q.rsample(n)                                     # [n, 2, 1]
    # components are 12 standard deviations apart: classify each sample by its nearest mean
    nearest = (z[:, 0] - mu[0, :, 0]).abs().argmin(-1)
    freq = torch.bincount(nearest, minlength=3).to(DT) / n
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3], dtype=DT), atol=0.015, rtol=0)
    torch.testing.assert_close(z.mean(0), q.mean, atol=0.1, rtol=0)
    torch.testing.assert_close(z.var(0), q.variance, rtol=0.05, atol=0)
    assert (z[:, 1] - 1.0).abs().max() < 3.0            # a weight-one component only


def test_mixture_rsample_gradients_reach_the_chosen_components_only():
    mu = torch.tensor([[0.0], [5.0]], dtype=DT, requires_grad=True)
    logvar = torch.zeros(2, 1, dtype=DT, requires_grad=True)
    logits = torch.tensor([0.0, float("-inf")], dtype=DT, requires_grad=True)
    z = DiagGaussianMixture(logits, mu, logvar).rsample(10)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.tensor([[10.0], [0.0]], dtype=DT))
    assert logits.grad is None                           # the draw is not differentiable


def test_priors():
    torch.manual_seed(3)
    std = mf.priors.StandardNormal(4).double()
    z = torch.randn(5, 3, 4, dtype=DT)
    torch.testing.assert_close(std.log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1))
    assert std.sample(7).shape == (7, 4) and std.sample(7).dtype == DT
    assert std.fused_args() is None
    gm = mf.priors.GaussianMixture(4, components=3).double()
    torch.testing.assert_close(gm.log_prob(z), _torch_mixture(gm.logits, gm.mu, gm.logvar).log_prob(z))
    gm.log_prob(z).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters())
    assert gm.sample(9).shape == (9, 4)
    with pytest.raises(ValueError, match="latent_dim"):
        mf.priors.StandardNormal(0)


def test_distribution_errors():
    with pytest.raises(ValueError, match="mu"):
        DiagGaussian(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="logits"):
        DiagGaussianMixture(torch.zeros(3), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
