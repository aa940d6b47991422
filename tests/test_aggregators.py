"""Aggregators: invariance to the order of the modalities and to the features of masked-out
modalities, banks equal to one subset at a time, subset-independent parts computed once, and
the PoE / MoE rules checked against densities written out with torch.distributions."""
import math

import pytest
import torch
from torch.distributions import Normal

import mmfast as mf
from mmfast.nn import AGGREGATORS

B, M, E, D = 5, 4, 12, 3
DT = torch.float64


def make(name):
    torch.manual_seed(0)
    cls = AGGREGATORS[name]
    if name in ("PoE", "MoE"):
        return cls(2 * D, D).double(), 2 * D
    options = dict(hidden=16)
    if name.startswith("SelfAttention"):
        options.update(width=16, num_heads=4, depth=2)
    if name.endswith("Mixture"):
        options.update(components=3)
    return cls(E, D, **options).double(), E


def summary(posterior, z):
    """Mean and log-density at z: invariant descriptions (a mixture's component order is not)."""
    return posterior.mean, posterior.log_prob(z)


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    yield


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_order_invariance(name):
    agg, F = make(name)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(B, M, F, generator=gen, dtype=DT)
    mask = torch.rand(B, M, generator=gen) < 0.6
    bank = mf.subsets.all_subsets(M, include_empty=True).expand(B, -1, -1)
    z = torch.randn(2, B, D, generator=gen, dtype=DT)
    for perm in (torch.tensor([3, 1, 0, 2]), torch.tensor([1, 2, 3, 0])):
        for m in (mask, bank):
            zz = z if m.dim() == 2 else z.unsqueeze(2)
            a = summary(agg(features, m), zz)
            b = summary(agg(features[:, perm], m[..., perm]), zz)
            for u, v in zip(a, b):
                torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_masked_out_features_are_ignored_even_nan(name):
    agg, F = make(name)
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(B, M, F, generator=gen, dtype=DT)
    mask = torch.rand(B, M, generator=gen) < 0.5
    mask[0] = False                                   # an empty subset
    mask[1] = True                                    # a full one
    z = torch.randn(3, B, D, generator=gen, dtype=DT)
    base = summary(agg(features, mask), z)
    for fill in (float("nan"), 1e6):
        other = torch.where(mask.unsqueeze(-1), features, torch.full_like(features, fill))
        other.requires_grad_(True)
        post = agg(other, mask)
        for u, v in zip(base, summary(post, z)):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
        agg.zero_grad()
        post.log_prob(z).sum().backward()
        assert torch.isfinite(other.grad).all()
        assert torch.all(other.grad[~mask] == 0)
        for p in agg.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_bank_equals_one_subset_at_a_time(name):
    agg, F = make(name)
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(B, M, F, generator=gen, dtype=DT)
    bank = mf.subsets.all_subsets(M, include_empty=True)
    # rows see different banks too: a random one per row
    per_row = torch.rand(B, 6, M, generator=gen) < 0.5
    z = torch.randn(2, B, D, generator=gen, dtype=DT)
    for masks in (bank.expand(B, -1, -1), per_row):
        together = agg(features, masks)
        assert together.batch_shape == masks.shape[:2]
        for s in range(masks.shape[1]):
            alone = agg(features, masks[:, s].contiguous())
            for u, v in zip(summary(together[:, s], z), summary(alone, z)):
                torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["SumPooling", "SumPoolingMixture", "SelfAttention",
                                  "SelfAttentionMixture", "PoEPlus", "MoEPlus"])
def test_subset_independent_parts_run_once_per_modality(name):
    agg, F = make(name)
    seen = []
    first = agg.embed if hasattr(agg, "embed") else agg.chi
    first.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    if hasattr(agg, "blocks"):
        agg.blocks[0].qkv.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    bank = mf.subsets.all_subsets(M, include_empty=True).expand(B, -1, -1)
    agg(torch.randn(B, M, F, dtype=DT), bank)
    assert seen and all(shape[:-1] == (B, M) for shape in seen), seen


def _normal_logpdf(z, mu, logvar):
    return Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)


def test_poe_is_the_product_of_the_subset_experts_and_the_prior():
    agg, _ = make("PoE")
    gen = torch.Generator().manual_seed(4)
    mu, logvar = torch.randn(B, M, D, generator=gen, dtype=DT), torch.randn(B, M, D, generator=gen, dtype=DT)
    mask = torch.rand(B, M, generator=gen) < 0.5
    post = agg(torch.cat([mu, logvar], -1), mask)
    for b in range(B):
        prec = torch.ones(D, dtype=DT) + sum((torch.exp(-logvar[b, m]) for m in range(M) if mask[b, m]),
                                              torch.zeros(D, dtype=DT))
        num = sum((mu[b, m] * torch.exp(-logvar[b, m]) for m in range(M) if mask[b, m]),
                  torch.zeros(D, dtype=DT))
        torch.testing.assert_close(post.mean[b], num / prec)
        torch.testing.assert_close(post.logvar[b], -torch.log(prec))


def test_moe_is_the_uniform_mixture_of_the_subset_experts_and_empty_gives_the_prior():
    agg, _ = make("MoE")
    gen = torch.Generator().manual_seed(5)
    mu, logvar = torch.randn(B, M, D, generator=gen, dtype=DT), torch.randn(B, M, D, generator=gen, dtype=DT)
    mask = torch.rand(B, M, generator=gen) < 0.5
    mask[0] = False
    mask[1, 0] = True
    post = agg(torch.cat([mu, logvar], -1), mask)
    z = torch.randn(4, B, D, generator=gen, dtype=DT)
    lp = post.log_prob(z)
    for b in range(B):
        members = [m for m in range(M) if mask[b, m]]
        if not members:
            expected = _normal_logpdf(z[:, b], torch.zeros(D, dtype=DT), torch.zeros(D, dtype=DT))
            mean = torch.zeros(D, dtype=DT)
        else:
            comps = torch.stack([_normal_logpdf(z[:, b], mu[b, m], logvar[b, m]) for m in members], -1)
            expected = torch.logsumexp(comps, -1) - math.log(len(members))
            mean = mu[b, members].mean(0)
        torch.testing.assert_close(lp[:, b], expected)
        torch.testing.assert_close(post.mean[b], mean)


@pytest.mark.parametrize("name", ["PoE", "MoE"])
def test_expert_aggregators_require_feature_dim_twice_latent(name):
    with pytest.raises(ValueError, match="feature_dim"):
        AGGREGATORS[name](7, 3)


def test_aggregator_input_errors_name_the_argument():
    agg, F = make("SumPooling")
    with pytest.raises(ValueError, match="features"):
        agg(torch.randn(B, M, F + 1, dtype=DT), torch.ones(B, M, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        agg(torch.randn(B, M, F, dtype=DT), torch.ones(B, M))
    with pytest.raises(ValueError, match="mask"):
        agg(torch.randn(B, M, F, dtype=DT), torch.ones(B, M + 1, dtype=torch.bool))
