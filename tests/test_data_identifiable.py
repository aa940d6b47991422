"""Identifiable simulations: shapes, the missingness pattern and the generative map, recomputed
from the stored parameters with explicit loops."""
import torch

from mmfast.data import IdentifiableBimodal, IdentifiableMultimodal


def _mlp_loop(layers, z_row):
    h = z_row.double()
    for i, (W, b) in enumerate(layers):
        h = torch.stack([sum(W[o, k] * h[k] for k in range(len(h))) + b[o] for o in range(W.shape[0])])
        if i < len(layers) - 1:
            h = torch.where(h > 0, h, 0.2 * h)
    return h


def test_bimodal_shapes_and_generator():
    data = IdentifiableBimodal(num_samples=600, latent_dim=2, num_segments=5, obs_dim=4,
                               noise_std=0.05, seed=1)
    assert data.modality_names == ("x", "label") and len(data) == 600
    b = data.batch(torch.arange(600))
    assert b["x"]["x"].shape == (600, 4) and b["x"]["label"].dtype == torch.int64
    assert b["observed"].all()
    assert torch.equal(b["x"]["label"], b["label"])
    assert set(b["label"].tolist()) == set(range(5))
    # z | u from the segment's Gaussian: standardised residuals have unit variance.
    u = b["label"]
    standard = (b["z"].double() - data.segment_means[u]) / data.segment_stds[u]
    assert abs(standard.std().item() - 1) < 0.08 and abs(standard.mean().item()) < 0.08
    # x = f(z) + noise, with f rebuilt by loops from the stored weights.
    for row in range(5):
        clean = _mlp_loop(data.mixing[0], b["z"][row])
        assert (b["x"]["x"][row].double() - clean).abs().max() < 5 * 0.05 + 1e-4


def test_multimodal_missingness():
    data = IdentifiableMultimodal(num_samples=4000, num_continuous=4, obs_dim=[3, 4, 5, 6], seed=2)
    assert data.modality_names == ("x0", "x1", "x2", "x3", "label")
    b = data.batch(torch.arange(len(data)))
    obs = b["observed"]
    assert obs.any(-1).all()                    # nobody is left with nothing
    assert 0.45 < obs.float().mean().item() < 0.6
    for m, name in enumerate(data.modality_names):
        missing = ~obs[:, m]
        assert torch.all(b["x"][name][missing] == 0)
    present = obs[:, 4]
    assert torch.equal(b["x"]["label"][present], b["label"][present])
    assert b["z"].shape == (4000, 2)


def test_seeded_and_split():
    a = IdentifiableMultimodal(num_samples=50, seed=3)
    b = IdentifiableMultimodal(num_samples=50, seed=3)
    t = IdentifiableMultimodal(num_samples=50, seed=3, split="test")
    assert torch.equal(a.x["x1"], b.x["x1"]) and torch.equal(a.observed, b.observed)
    assert torch.equal(a.segment_means, t.segment_means)
    assert not torch.equal(a.extras["z"], t.extras["z"])
