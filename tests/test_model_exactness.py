"""The exactness property of METHOD.md on a linear-Gaussian model with exact posteriors:
the masked objective equals log p(x) for every subset and every sample, the mixture objective
falls short by the closed-form gap, and IWAE with exact proposals is exact. Expectations come
from the joint Gaussian (torch.distributions.MultivariateNormal), not from mmfast."""
import math

import pytest
import torch

import mmfast as mf
from _linear_gaussian import DT, LinearGaussian

TOL = dict(rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def lg():
    return LinearGaussian()


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    yield


def _log_p_rows(lg, x, masks):
    """log p(x_S) for per-row subsets ``masks [B, M]`` (grouped by subset)."""
    out = torch.empty(masks.shape[0], dtype=DT)
    for code in mf.subsets.encode(masks).unique():
        rows = mf.subsets.encode(masks) == code
        sub = {k: v[rows] for k, v in x.items()}
        out[rows] = lg.log_marginal(sub, mf.subsets.decode(code, masks.shape[1]).tolist())
    return out


@pytest.mark.parametrize("representation", ["gaussian", "mixture1"])
@pytest.mark.parametrize("K", [1, 6])
def test_masked_objective_equals_log_px_for_every_subset(lg, representation, K):
    torch.manual_seed(0)
    x = lg.sample(40)
    model = lg.model(representation)
    exact = lg.log_marginal(x, [True] * 3)
    subset = mf.subsets.all_subsets(3, include_empty=True).repeat(5, 1)      # every S, 5 rows each
    out = model.objective(x, subset=subset, num_samples=K)
    assert out.value.shape == (40,) and out.value.dtype == DT
    torch.testing.assert_close(out.value, exact, **TOL)
    # every importance weight is exact, not only their log-mean-exp
    torch.testing.assert_close(out.log_weights, exact.expand(K, -1), **TOL)
    full = subset.all(1)
    assert torch.all(out.terms["rec_rest"][full] == 0)
    torch.testing.assert_close(out.terms["kl_rest"][full], torch.zeros(int(full.sum()), dtype=DT), **TOL)


@pytest.mark.parametrize("K", [1, 3])
def test_masked_objective_on_a_subset_bank(lg, K):
    torch.manual_seed(1)
    x = lg.sample(9)
    bank = mf.subsets.all_subsets(3, include_empty=True)
    out = lg.model().objective(x, subset=bank.expand(9, -1, -1), num_samples=K)
    assert out.value.shape == (9, 8)
    torch.testing.assert_close(out.value, lg.log_marginal(x, [True] * 3)[:, None].expand(9, 8), **TOL)


def test_masked_objective_with_missing_modalities_gives_log_p_of_the_observed(lg):
    torch.manual_seed(2)
    x = lg.sample(64)
    observed = torch.rand(64, 3) < 0.6
    out = lg.model().objective(x, observed=observed, num_samples=2)
    torch.testing.assert_close(out.value, _log_p_rows(lg, x, observed), **TOL)


def test_mixture_prior_with_one_standard_component_is_exact_on_both_paths(lg):
    torch.manual_seed(3)
    x = lg.sample(12)
    prior = mf.priors.GaussianMixture(lg.d, components=1)
    with torch.no_grad():
        prior.mu.zero_()
    for representation in ("gaussian", "mixture1"):
        out = lg.model(representation, prior=prior).objective(x, num_samples=2)
        torch.testing.assert_close(out.value, lg.log_marginal(x, [True] * 3), **TOL)


def test_mixture_objective_full_subset_is_exact_and_others_fall_short_by_the_gap(lg):
    torch.manual_seed(4)
    one = lg.sample(1, seed=5)
    n = 4000
    x = {k: v.expand(n, -1) for k, v in one.items()}
    model = lg.model()
    exact = lg.log_marginal(one, [True] * 3)[0]
    full = model.objective(x, subset=torch.ones(n, 3, dtype=torch.bool), kind="mixture")
    torch.testing.assert_close(full.value, exact.expand(n), **TOL)
    for subset in ([True, False, False], [False, True, True], [False, False, False]):
        out = model.objective(x, subset=torch.tensor(subset).expand(n, 3), kind="mixture")
        # E[w] = log p(x_S) + E_{p(z|x_S)} log p(x_rest | z), in closed form
        mean, cov = lg.posterior(one, subset)
        expected = lg.log_marginal(one, subset)[0]
        for m, on in enumerate(subset):
            if not on:
                W, b, xm = lg.W[m], lg.b[m], one[lg.names[m]][0]
                r = xm - W @ mean[0] - b
                expected += -0.5 * (W.shape[0] * math.log(2 * math.pi) + r @ r
                                    + torch.trace(W @ cov @ W.T))
        v = out.value
        stderr = v.std() / math.sqrt(n)
        assert abs(v.mean() - expected) < 5 * stderr + 1e-9
        assert expected < exact and v.mean() < exact


def test_log_likelihood_with_exact_proposals_is_exact_joint_and_marginal(lg):
    torch.manual_seed(6)
    x = lg.sample(10)
    model = lg.model()
    ll = model.log_likelihood(x, num_samples=7, chunk_size=3)
    torch.testing.assert_close(ll, lg.log_marginal(x, [True] * 3), **TOL)
    for m in range(3):
        observed = torch.zeros(10, 3, dtype=torch.bool)
        observed[:, m] = True
        marginal = model.log_likelihood(x, observed=observed, num_samples=5)
        subset = [i == m for i in range(3)]
        torch.testing.assert_close(marginal, lg.log_marginal(x, subset), **TOL)
    # a modality absent from x altogether is allowed when it is unobserved
    part = {k: v for k, v in x.items() if k != "m1"}
    torch.testing.assert_close(model.log_likelihood(part, num_samples=4),
                               lg.log_marginal(x, [True, False, True]), **TOL)


def test_iwae_with_an_inexact_proposal_approaches_the_exact_log_likelihood(lg):
    torch.manual_seed(7)
    x = lg.sample(16)
    model = lg.model()
    model.aggregator.variance_factor = 2.5          # proposals twice too wide: not exact
    exact = lg.log_marginal(x, [True] * 3)
    gap_1 = (exact - model.log_likelihood(x, num_samples=1)).mean()
    gap_many = (exact - model.log_likelihood(x, num_samples=2000)).mean()
    assert gap_1 > 0.5                               # an ELBO-like single sample is well below
    assert 0 <= gap_many < 0.1 * gap_1
