"""Stop-gradient rules of the objectives and NaN safety for missing modalities.

The stl expectations are written out with torch.distributions from the samples the model
reports (ε recovered as (z − μ)/σ), so they do not re-use mmfast's densities."""
import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

import mmfast as mf
from mmfast.nn import AGGREGATORS

DT = torch.float64
M, D_LAT = 3, 2


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    yield


class TableAggregator(nn.Module):
    """q(z | x_S) = N(mu_table[code(S)], exp(logvar_table[code(S)])): one free Gaussian per
    subset, so gradients can be read per posterior."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.mu = nn.Parameter(torch.randn(2 ** M, D_LAT, generator=gen, dtype=DT))
        self.logvar = nn.Parameter(0.3 * torch.randn(2 ** M, D_LAT, generator=gen, dtype=DT))

    def forward(self, features, mask):
        code = mf.subsets.encode(mask)
        return mf.distributions.DiagGaussian(self.mu[code], self.logvar[code])


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 1, dtype=DT)


class Linear(nn.Module):
    def __init__(self, W):
        super().__init__()
        self.register_buffer("W", W)

    def forward(self, z):
        return z @ self.W.T


def table_model():
    gen = torch.Generator().manual_seed(1)
    Ws = [torch.randn(3, D_LAT, generator=gen, dtype=DT) for _ in range(M)]
    mods = {f"m{i}": mf.Modality(Zero(), Linear(W), "normal", scale=1.0) for i, W in enumerate(Ws)}
    return mf.MultiModalVAE(mods, TableAggregator(), mf.priors.StandardNormal(D_LAT).double()), Ws


def _logN(z, mu, logvar):
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1).log_prob(z)


@pytest.mark.parametrize("stl", [True, False])
def test_masked_objective_gradients_follow_the_stop_gradient_rules(stl):
    model, Ws = table_model()
    agg = model.aggregator
    B = 6
    gen = torch.Generator().manual_seed(2)
    x = {f"m{i}": torch.randn(B, 3, generator=gen, dtype=DT) for i in range(M)}
    subset = torch.tensor([True, False, True]).expand(B, M)
    s_code, f_code = 0b101, 0b111
    torch.manual_seed(3)
    out = model.objective(x, subset=subset, num_samples=1, stl=stl)
    grads = torch.autograd.grad(out.value.sum(), (agg.mu, agg.logvar), retain_graph=True)

    # the same value, written from METHOD.md with the stl detaching rules
    mu_s, lv_s, mu_f, lv_f = agg.mu[s_code], agg.logvar[s_code], agg.mu[f_code], agg.logvar[f_code]
    eps_s = ((out.z_subset[0] - mu_s) / torch.exp(0.5 * lv_s)).detach()
    eps_f = ((out.z_full[0] - mu_f) / torch.exp(0.5 * lv_f)).detach()
    z_s = mu_s + torch.exp(0.5 * lv_s) * eps_s
    z = mu_f + torch.exp(0.5 * lv_f) * eps_f
    q = (lambda t: t.detach()) if stl else (lambda t: t)
    rec = lambda zz, m: Normal(zz @ Ws[m].T, 1.0).log_prob(x[f"m{m}"]).sum(-1)
    w = (rec(z_s, 0) + rec(z_s, 2) + _logN(z_s, torch.zeros(D_LAT, dtype=DT), torch.zeros(D_LAT, dtype=DT))
         - _logN(z_s, q(mu_s), q(lv_s)) + rec(z, 1) + _logN(z, mu_s, lv_s) - _logN(z, q(mu_f), q(lv_f)))
    torch.testing.assert_close(out.value, w.detach())
    expected = torch.autograd.grad(w.sum(), (agg.mu, agg.logvar), retain_graph=True)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_stl_leaves_only_the_sample_path_in_the_own_log_densities():
    model, _ = table_model()
    agg = model.aggregator
    B = 5
    x = {f"m{i}": torch.randn(B, 3, dtype=DT) for i in range(M)}
    subset = torch.tensor([False, True, False]).expand(B, M)
    s_code, f_code = 0b010, 0b111
    for stl in (True, False):
        torch.manual_seed(4)
        out = model.objective(x, subset=subset, stl=stl)
        sig_f = torch.exp(0.5 * agg.logvar[f_code]).detach()
        eps_f = (out.z_full[0] - agg.mu[f_code]).detach() / sig_f
        g_mu, g_lv = torch.autograd.grad(out.terms["log_q_full"].sum(), (agg.mu, agg.logvar),
                                         retain_graph=True)
        if stl:
            # d/dθ log q(z(θ); θ̄): the score is gone, the path −ε/σ · dz/dθ remains
            torch.testing.assert_close(g_mu[f_code], (-eps_f / sig_f).sum(0))
            torch.testing.assert_close(g_lv[f_code], (-0.5 * eps_f ** 2).sum(0))
        else:
            # the full derivative of log N(μ + σε; μ, σ) in μ is 0 and in logvar is −1/2
            torch.testing.assert_close(g_mu[f_code], torch.zeros(D_LAT, dtype=DT))
            torch.testing.assert_close(g_lv[f_code], torch.full((D_LAT,), -0.5 * B, dtype=DT))
        # the same rule for log q(z_S | x_S)
        sig_s = torch.exp(0.5 * agg.logvar[s_code]).detach()
        eps_s = (out.z_subset[0] - agg.mu[s_code]).detach() / sig_s
        g_mu, g_lv = torch.autograd.grad(out.terms["log_q_subset"].sum(), (agg.mu, agg.logvar),
                                         retain_graph=True)
        if stl:
            torch.testing.assert_close(g_mu[s_code], (-eps_s / sig_s).sum(0))
            torch.testing.assert_close(g_lv[s_code], (-0.5 * eps_s ** 2).sum(0))
        else:
            torch.testing.assert_close(g_mu[s_code], torch.zeros(D_LAT, dtype=DT))
        # log q(z | x_S) at the full sample is never detached: its score in μ_S is (z − μ_S)/σ_S²
        g_mu, = torch.autograd.grad(out.terms["log_q_full_given_subset"].sum(), (agg.mu,),
                                    retain_graph=True)
        score = ((out.z_full[0] - agg.mu[s_code]) / sig_s ** 2).detach().sum(0)
        torch.testing.assert_close(g_mu[s_code], score)
        assert score.abs().max() > 1e-3


def small_model(name, F=8, d=3, dims=(4, 5, 3)):
    torch.manual_seed(0)
    cls = AGGREGATORS[name]
    expert = name in ("PoE", "MoE")
    E = 2 * d if expert else F
    options = {} if expert else dict(hidden=16)
    if name.startswith("SelfAttention"):
        options.update(width=16)
    mods = {f"m{i}": mf.Modality(mf.nn.MLPEncoder(D, E, (16,)), mf.nn.MLPDecoder(d, D, (16,)),
                                 "normal", scale="learned") for i, D in enumerate(dims)}
    return mf.MultiModalVAE(mods, cls(E, d, **options), mf.priors.StandardNormal(d)), dims


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_missing_modalities_holding_nan_give_finite_values_and_gradients(name):
    model, dims = small_model(name)
    B = 12
    gen = torch.Generator().manual_seed(5)
    clean = {f"m{i}": torch.randn(B, D, generator=gen) for i, D in enumerate(dims)}
    observed = torch.rand(B, 3, generator=gen) < 0.5
    observed[0] = False                                      # a sample with nothing observed
    poisoned = {k: torch.where(observed[:, i, None], v, torch.full_like(v, float("nan")))
                for i, (k, v) in enumerate(clean.items())}
    zeros = {k: torch.where(observed[:, i, None], v, torch.zeros_like(v))
             for i, (k, v) in enumerate(clean.items())}
    bank = mf.subsets.all_subsets(3, include_empty=True).expand(B, -1, -1)
    for kind in ("masked", "mixture"):
        for subset in (None, bank):
            torch.manual_seed(6)
            out = model.objective(poisoned, observed=observed, subset=subset, kind=kind, num_samples=2)
            assert torch.isfinite(out.value).all()
            model.zero_grad()
            out.loss.backward()
            for p in model.parameters():
                assert p.grad is None or torch.isfinite(p.grad).all()
            torch.manual_seed(6)
            ref = model.objective(zeros, observed=observed, subset=subset, kind=kind, num_samples=2)
            torch.testing.assert_close(out.value, ref.value, rtol=0, atol=0)
    assert torch.isfinite(model.log_likelihood(poisoned, observed=observed, num_samples=8)).all()
    rec = model.reconstruct(poisoned, observed)
    assert all(torch.isfinite(v).all() for v in rec.values())
