"""LinearGaussian: structure of the generator and its closed forms against direct Gaussian algebra
(the joint covariance of (z, x_S) written out and conditioned/marginalised with dense matrices)."""
import itertools
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from mmfast.data import LinearGaussian, gaussian_kl_to_full


@pytest.fixture(scope="module")
def lg():
    return LinearGaussian(num_samples=40, num_modalities=3, private_dim=2, shared_dim=3,
                          min_dim=6, max_dim=11, noise_std=0.7, seed=3)


def _stack(lg, subset):
    W = torch.cat([lg.loadings[m] for m in subset])
    b = torch.cat([lg.biases[m] for m in subset])
    x = torch.cat([lg.x[f"x{m}"].double() for m in subset], dim=1)
    return W, b, x


def test_structure_orthonormal_blocks(lg):
    M, p, s = 3, 2, 3
    assert lg.latent_dim == M * p + s
    for m, W in enumerate(lg.loadings):
        assert 6 <= W.shape[0] < 11
        cols = list(range(m * p, (m + 1) * p)) + list(range(M * p, M * p + s))
        block = W[:, cols]
        torch.testing.assert_close(block.T @ block, torch.eye(p + s, dtype=torch.float64))
        others = [c for c in range(lg.latent_dim) if c not in cols]
        assert torch.all(W[:, others] == 0)


def test_seeded_and_splits_share_parameters():
    a = LinearGaussian(num_samples=10, seed=5)
    b = LinearGaussian(num_samples=10, seed=5)
    t = LinearGaussian(num_samples=10, seed=5, split="test")
    c = LinearGaussian(num_samples=10, seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a.loadings, b.loadings))
    assert torch.equal(a.x["x0"], b.x["x0"])
    assert all(torch.equal(u, v) for u, v in zip(a.loadings, t.loadings))
    assert not torch.equal(a.x["x0"], t.x["x0"])
    assert not torch.equal(a.biases[0], c.biases[0])


def test_samples_follow_the_model():
    lg = LinearGaussian(num_samples=4000, num_modalities=2, private_dim=1, shared_dim=1,
                        dims=[3, 4], noise_std=0.5, seed=1)
    W, b, x = _stack(lg, [0, 1])
    cov = W @ W.T + 0.25 * torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(x.mean(0), b, atol=0.08, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.12, rtol=0)


@pytest.mark.parametrize("subset", [s for r in (1, 2, 3) for s in itertools.combinations(range(3), r)])
def test_log_marginal_equals_dense_gaussian(lg, subset):
    W, b, x = _stack(lg, subset)
    dense = MultivariateNormal(b, W @ W.T + lg.noise_std ** 2 * torch.eye(len(b), dtype=torch.float64))
    mask = torch.tensor([m in subset for m in range(3)])
    torch.testing.assert_close(lg.log_marginal(subset=mask), dense.log_prob(x), rtol=1e-10, atol=1e-9)


def test_log_marginal_per_row_subsets_and_empty(lg):
    masks = torch.zeros(len(lg), 3, dtype=torch.bool)
    masks[::2, 0] = True
    masks[1::2, 1:] = True
    masks[5] = False
    got = lg.log_marginal(subset=masks)
    assert got[5] == 0.0
    for row in (0, 1, 2, 3):
        subset = [m for m in range(3) if masks[row, m]]
        W, b, x = _stack(lg, subset)
        dense = MultivariateNormal(b, W @ W.T + lg.noise_std ** 2 * torch.eye(len(b), dtype=torch.float64))
        torch.testing.assert_close(got[row], dense.log_prob(x[row]), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("subset", [(0,), (1, 2), (0, 1, 2)])
def test_posterior_equals_gaussian_conditioning(lg, subset):
    W, b, x = _stack(lg, subset)
    d = lg.latent_dim
    cov_xx = W @ W.T + lg.noise_std ** 2 * torch.eye(len(b), dtype=torch.float64)
    gain = W.T @ torch.linalg.inv(cov_xx)                      # Cov(z, x_S) Cov(x_S)^{-1}
    mean = (x - b) @ gain.T
    cov = torch.eye(d, dtype=torch.float64) - gain @ W
    mask = torch.tensor([m in subset for m in range(3)])
    got_mean, got_precision = lg.posterior(subset=mask)
    torch.testing.assert_close(got_mean, mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.linalg.inv(got_precision[0]), cov, rtol=1e-9, atol=1e-10)


def test_orthonormal_posteriors_are_diagonal(lg):
    _, precision = lg.posterior()
    off = precision[0] - torch.diag(torch.diagonal(precision[0]))
    assert off.abs().max() < 1e-12
    # shared coordinates are seen by all 3 modalities, private ones by one: 1 + k / σ².
    diag = torch.diagonal(precision[0])
    torch.testing.assert_close(diag[:6], torch.full((6,), 1 + 1 / 0.49, dtype=torch.float64))
    torch.testing.assert_close(diag[6:], torch.full((3,), 1 + 3 / 0.49, dtype=torch.float64))


def test_kl_closed_form_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    B, d = 4, 5
    q_mean = torch.randn(B, d, generator=gen, dtype=torch.float64)
    q_var = torch.rand(B, d, generator=gen, dtype=torch.float64) + 0.1
    A = torch.randn(B, d, d, generator=gen, dtype=torch.float64)
    precision = A @ A.transpose(-1, -2) + torch.eye(d, dtype=torch.float64)
    p_mean = torch.randn(B, d, generator=gen, dtype=torch.float64)
    expected = kl_divergence(MultivariateNormal(q_mean, torch.diag_embed(q_var)),
                             MultivariateNormal(p_mean, precision_matrix=precision))
    torch.testing.assert_close(gaussian_kl_to_full(q_mean, q_var, p_mean, precision), expected)
    # a diagonal Gaussian has KL 0 to itself
    assert not math.isclose(float(expected.abs().min()), 0.0)
    diag_prec = torch.diag_embed(1 / q_var)
    torch.testing.assert_close(gaussian_kl_to_full(q_mean, q_var, q_mean, diag_prec),
                               torch.zeros(B, dtype=torch.float64), atol=1e-12, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        LinearGaussian(num_samples=2, split="dev")
    with pytest.raises(ValueError, match="dims"):
        LinearGaussian(num_samples=2, num_modalities=2, dims=[3, 40], private_dim=5, shared_dim=5)
    lg = LinearGaussian(num_samples=2, num_modalities=2, dims=[10, 10])
    with pytest.raises(ValueError, match="subset"):
        lg.log_marginal(subset=torch.ones(3, dtype=torch.bool))
