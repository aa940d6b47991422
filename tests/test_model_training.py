"""A short training run on synthetic data lowers the loss, for every aggregator and both
objectives; plus the model's API edges (likelihoods, scales, inputs, reconstruct, sample)."""
import pytest
import torch

import mmfast as mf
from mmfast.nn import AGGREGATORS

DIMS = (6, 4, 5)
D_LAT = 2


@pytest.fixture(autouse=True)
def _reference(reference_backend):
    yield


def synthetic(n, seed):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.Generator().manual_seed(100)               # the same generative map every time
    maps = [torch.randn(D_LAT, D, generator=mix) for D in DIMS]
    z = torch.randn(n, D_LAT, generator=gen)
    return {f"m{i}": torch.tanh(z @ A) + 0.1 * torch.randn(n, A.shape[1], generator=gen)
            for i, A in enumerate(maps)}


def build(name, d=D_LAT):
    torch.manual_seed(0)
    expert = name in ("PoE", "MoE")
    E = 2 * d if expert else 16
    options = {} if expert else dict(hidden=32)
    if name.startswith("SelfAttention"):
        options.update(width=16)
    if name.endswith("Mixture"):
        options.update(components=2)
    mods = {f"m{i}": mf.Modality(mf.nn.MLPEncoder(D, E, (32,)), mf.nn.MLPDecoder(d, D, (32,)),
                                 "normal", scale="learned") for i, D in enumerate(DIMS)}
    return mf.MultiModalVAE(mods, AGGREGATORS[name](E, d, **options), mf.priors.StandardNormal(d))


def eval_loss(model, x, kind):
    bank = mf.subsets.all_subsets(len(DIMS), include_empty=True).expand(x["m0"].shape[0], -1, -1)
    torch.manual_seed(123)
    with torch.no_grad():
        return float(model.objective(x, subset=bank, kind=kind, num_samples=1).loss)


@pytest.mark.parametrize("kind", ["masked", "mixture"])
@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_short_training_lowers_the_loss(name, kind):
    model = build(name)
    train, test = synthetic(256, 1), synthetic(256, 2)
    before = eval_loss(model, test, kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(7)
    for step in range(60):
        rows = torch.randint(0, 256, (64,))
        loss = model.objective({k: v[rows] for k, v in train.items()}, kind=kind).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss(model, test, kind)
    assert after < before - 1.0, (before, after)


def test_likelihoods_and_scales():
    torch.manual_seed(0)
    B, d = 6, 3
    enc = lambda shape: mf.nn.MLPEncoder(shape, 8, (8,))
    mods = {
        "fixed": mf.Modality(enc(4), mf.nn.MLPDecoder(d, 4, (8,)), "laplace", scale=0.75),
        "learned": mf.Modality(enc((2, 3)), mf.nn.MLPDecoder(d, (2, 3), (8,)), "normal", scale="learned"),
        "decoded": mf.Modality(enc(5), mf.nn.MLPDecoder(d, 5, (8,), output="loc_scale"), "laplace"),
        "bits": mf.Modality(enc(7), mf.nn.MLPDecoder(d, 7, (8,)), "bernoulli"),
        "text": mf.Modality(mf.nn.TextEncoder(8, num_classes=5, dim=4),
                            mf.nn.TextDecoder(d, num_classes=5, dim=4), "categorical"),
    }
    model = mf.MultiModalVAE(mods, mf.nn.SumPooling(8, d, hidden=8), mf.priors.GaussianMixture(d, 3))
    labels = torch.randint(0, 5, (B, 8))
    x = {"fixed": torch.randn(B, 4), "learned": torch.randn(B, 2, 3), "decoded": torch.randn(B, 5),
         "bits": (torch.rand(B, 7) < 0.5).float(), "text": labels}
    out = model.objective(x, subset=torch.ones(B, 5, dtype=torch.bool))
    out.loss.backward()
    assert mods["learned"].log_scale.grad is not None and model.prior.mu.grad is not None
    # the reconstruction terms equal the likelihoods written out from the decoded parameters
    z = out.z_subset                                                     # [1, B, d]
    Lap, Nor = torch.distributions.Laplace, torch.distributions.Normal
    with torch.no_grad():
        loc = mods["fixed"].decoder(z[0])
        expect = Lap(loc, 0.75).log_prob(x["fixed"]).sum(-1)
        torch.testing.assert_close(out.terms["rec/fixed"], expect)
        loc = mods["learned"].decoder(z[0])
        scale = 1e-3 + torch.exp(mods["learned"].log_scale)
        torch.testing.assert_close(out.terms["rec/learned"], Nor(loc, scale).log_prob(x["learned"]).sum((-1, -2)))
        loc, log_scale = mods["decoded"].decoder(z[0])
        expect = Lap(loc, 1e-3 + log_scale.exp()).log_prob(x["decoded"]).sum(-1)
        torch.testing.assert_close(out.terms["rec/decoded"], expect)
        logits = mods["bits"].decoder(z[0])
        expect = torch.distributions.Bernoulli(logits=logits).log_prob(x["bits"]).sum(-1)
        torch.testing.assert_close(out.terms["rec/bits"], expect)
        logits = mods["text"].decoder(z[0])
        expect = torch.distributions.Categorical(logits=logits).log_prob(labels).sum(-1)
        torch.testing.assert_close(out.terms["rec/text"], expect)
    # one-hot text gives the same likelihood as class indices
    onehot = dict(x, text=torch.nn.functional.one_hot(labels, 5).float())
    torch.manual_seed(1)
    a = model.objective(x, subset=torch.ones(B, 5, dtype=torch.bool)).value
    torch.manual_seed(1)
    b = model.objective(onehot, subset=torch.ones(B, 5, dtype=torch.bool)).value
    torch.testing.assert_close(a, b)
    rec = model.reconstruct(x, ["text"])
    assert rec["text"].shape == (B, 8, 5) and rec["learned"].shape == (B, 2, 3)
    torch.testing.assert_close(rec["text"].sum(-1), torch.ones(B, 8))
    samples = model.sample(4)
    assert samples["bits"].shape == (4, 7) and ((samples["bits"] >= 0) & (samples["bits"] <= 1)).all()
    assert model.log_likelihood(x, num_samples=20, chunk_size=6).shape == (B,)


def test_decoders_run_only_on_the_rows_that_use_them():
    model = build("SumPooling")
    seen = {}
    for name, mod in model.modalities.items():
        mod.decoder.register_forward_hook(lambda m, inp, out, name=name: seen.setdefault(name, []).append(inp[0].shape[0]))
    x = synthetic(10, 3)
    subset = torch.zeros(10, 3, dtype=torch.bool)
    subset[:4, 0] = True                       # m0 in S for 4 rows, m1 and m2 in no subset
    model.objective(x, subset=subset, num_samples=3)
    # m0: 4 rows from z_S plus 6 rows from the full z; m1, m2: all 10 rows from z only
    assert seen == {"m0": [3 * (4 + 6)], "m1": [3 * 10], "m2": [3 * 10]}
    seen.clear()
    model.objective(x, subset=subset, kind="mixture")
    assert seen == {"m0": [10], "m1": [10], "m2": [10]}
    seen.clear()
    observed = torch.ones(10, 3, dtype=torch.bool)
    observed[:, 2] = False
    model.objective(x, observed=observed, subset=torch.ones(10, 3, dtype=torch.bool))
    assert "m2" not in seen                    # observed nowhere: never decoded


def test_input_errors():
    model = build("PoE")
    x = synthetic(4, 0)
    with pytest.raises(ValueError, match="unknown modalities"):
        model.objective(dict(x, extra=torch.zeros(4, 1)))
    with pytest.raises(ValueError, match="observed"):
        model.objective(x, observed=torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="subset"):
        model.objective(x, subset=torch.ones(4, 3))
    with pytest.raises(ValueError, match="kind"):
        model.objective(x, kind="elbo")
    with pytest.raises(ValueError, match="m1"):
        model.objective({k: v for k, v in x.items() if k != "m1"}, observed=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="event_shape"):
        mf.Modality(torch.nn.Identity(), torch.nn.Identity(), "normal", scale="learned")
    with pytest.raises(ValueError, match="no scale"):
        mf.Modality(torch.nn.Identity(), torch.nn.Identity(), "bernoulli", scale=1.0)
    with pytest.raises(ValueError, match="likelihood"):
        mf.Modality(torch.nn.Identity(), torch.nn.Identity(), "poisson")
    before = {k: v.clone() for k, v in x.items()}
    model.objective(x, observed=torch.tensor([[True, False, True]] * 4))
    assert all(torch.equal(before[k], x[k]) for k in x)      # inputs are not mutated


def test_mnist_svhn_text_architectures():
    torch.manual_seed(0)
    d, B = 20, 3
    E = 2 * d
    model = mf.MultiModalVAE({
        "mnist": mf.Modality(mf.nn.MNISTEncoder(E), mf.nn.MNISTDecoder(d), "laplace", scale=0.75),
        "svhn": mf.Modality(mf.nn.SVHNEncoder(E), mf.nn.SVHNDecoder(d), "laplace", scale=0.75),
        "text": mf.Modality(mf.nn.TextEncoder(E), mf.nn.TextDecoder(d), "categorical"),
    }, mf.nn.PoEPlus(E, d, hidden=32), mf.priors.StandardNormal(d))
    x = {"mnist": torch.rand(B, 1, 28, 28), "svhn": torch.rand(B, 3, 32, 32),
         "text": torch.randint(0, 71, (B, 8))}
    bank = mf.subsets.all_subsets(3).expand(B, -1, -1)
    out = model.objective(x, subset=bank, num_samples=2)
    assert out.value.shape == (B, 7) and torch.isfinite(out.value).all()
    out.loss.backward()
    assert model.log_likelihood(x, num_samples=5, max_rows=4).shape == (B,)
    rec = model.reconstruct(x, ["mnist"])
    assert rec["svhn"].shape == (B, 3, 32, 32) and rec["text"].shape == (B, 8, 71)
    assert ((rec["mnist"] >= 0) & (rec["mnist"] <= 1)).all()


@pytest.mark.parametrize("name", ["SumPooling", "SelfAttention", "PoE", "MoE"])
def test_whatever_kernels_exist_give_the_reference_objective(name):
    """The model under the ``auto`` backend (Triton kernels where they exist; in the
    interpreter on CPU) matches the reference backend. Tiny shapes: interpreted grids are slow."""
    model = build(name)
    x = synthetic(5, 4)
    observed = torch.tensor([[True, True, False], [True, True, True], [False, True, True],
                             [True, False, False], [True, True, True]])
    bank = mf.subsets.all_subsets(3, include_empty=True).expand(5, -1, -1)
    results = []
    for backend in ("reference", "auto"):
        with mf.use_backend(backend):
            torch.manual_seed(9)
            out = model.objective(x, observed=observed, subset=bank, num_samples=2)
            model.zero_grad()
            out.loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            results.append((out.value.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    for a, r in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
