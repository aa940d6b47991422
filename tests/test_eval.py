"""mmfast.eval: MCC with an exact assignment (checked against all permutations)."""
import itertools

import pytest
import torch

from mmfast.eval.mcc import correlation_matrix, linear_assignment, mcc


@pytest.mark.parametrize("n,m", [(1, 1), (3, 3), (5, 5), (4, 6), (6, 4)])
def test_assignment_is_optimal(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    for _ in range(5):
        cost = torch.rand(n, m, generator=gen).tolist()
        pairs = linear_assignment(cost)
        assert len(pairs) == min(n, m)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == min(n, m)
        got = sum(cost[r][c] for r, c in pairs)
        if n <= m:
            best = min(sum(cost[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j]][j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert got == pytest.approx(best, abs=1e-12)


def test_correlation_matrix_matches_numpy_formula():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 3, generator=gen), torch.randn(200, 2, generator=gen)
    full = torch.corrcoef(torch.cat([a, b], 1).T.double())
    torch.testing.assert_close(correlation_matrix(a, b), full[:3, 3:])


def test_mcc_recovers_permutation_sign_and_scale():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1000, 4, generator=gen)
    z_hat = torch.stack([-3 * z[:, 2], 0.5 * z[:, 0] + 2, z[:, 3], -z[:, 1]], 1)
    assert mcc(z, z_hat) == pytest.approx(1.0, abs=1e-9)
    noise = torch.randn(1000, 4, generator=gen)
    assert mcc(z, noise) < 0.15
    # half signal half noise per coordinate: correlation 1/sqrt(2) each
    assert mcc(z, (z + torch.randn(1000, 4, generator=gen))[:, [1, 0, 3, 2]]) == pytest.approx(2 ** -0.5, abs=0.05)
    with pytest.raises(ValueError, match="same N"):
        mcc(z, z[:10])


# ------------------------------------------------------------------ LinearGaussian diagnostics
from types import SimpleNamespace  # noqa: E402

from torch.distributions import MultivariateNormal  # noqa: E402

from mmfast.data import LinearGaussian  # noqa: E402
from mmfast.eval import linear_gaussian_report  # noqa: E402


class _ExactMinusC(torch.nn.Module):
    """objective value = exact log p(x_observed) (dense Gaussian) - c for every subset."""

    def __init__(self, lg, c):
        super().__init__()
        self.lg, self.c = lg, c

    def objective(self, x, observed=None, subset=None, kind="masked", num_samples=1):
        xs = torch.cat([x[f"x{m}"].double() for m in range(len(self.lg.loadings))], 1)
        W, b = torch.cat(self.lg.loadings), torch.cat(self.lg.biases)
        ll = MultivariateNormal(b, W @ W.T + torch.eye(len(b), dtype=torch.float64)).log_prob(xs)
        return SimpleNamespace(value=(ll - self.c)[:, None].expand(*subset.shape[:2]))


def test_linear_gaussian_report_gap_and_kl():
    lg = LinearGaussian(num_samples=30, num_modalities=2, private_dim=1, shared_dim=1, dims=[3, 4], seed=0)
    decoders = []
    for W, b in zip(lg.loadings, lg.biases):
        lin = torch.nn.Linear(W.shape[1], W.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(b)
        decoders.append(lin)
    delta = 0.3

    def posterior_fn(x, mask):
        # exact diagonal posterior (orthonormal loadings): precision 1 + #modalities seeing it
        mean, precision = lg.posterior(x, mask)
        var = 1 / torch.diagonal(precision, dim1=-2, dim2=-1)
        shifted = mean.clone()
        shifted[:, 0] += delta
        return SimpleNamespace(mu=shifted, logvar=var.log())

    out = linear_gaussian_report(_ExactMinusC(lg, 2.0), lg, decoders, 1.0, posterior_fn,
                                 kind="masked", batch_size=7)
    xs = torch.cat([lg.x["x0"], lg.x["x1"]], 1).double()
    W, b = torch.cat(lg.loadings), torch.cat(lg.biases)
    exact = MultivariateNormal(b, W @ W.T + torch.eye(7, dtype=torch.float64)).log_prob(xs)
    assert out["exact_llh"] == pytest.approx(float(exact.mean()), rel=1e-9)
    assert out["gap"] == pytest.approx(2.0 / abs(float(exact.mean())), rel=1e-9)
    # KL of N(μ + δ e_0, Λ^{-1}) to N(μ, Λ^{-1}) with diagonal Λ is δ² Λ_00 / 2; coordinate 0 is
    # modality 0's private latent: Λ_00 = 2 when x0 is given, 1 otherwise.
    assert out["kl_full"] == pytest.approx(delta ** 2 * 2 / 2, rel=1e-9)
    assert out["kl_x0"] == pytest.approx(delta ** 2 * 2 / 2, rel=1e-9)
    assert out["kl_x1"] == pytest.approx(delta ** 2 * 1 / 2, rel=1e-9)
    assert out["kl_exact"] == 1.0


def test_pictures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from mmfast.eval import plots
    from mmfast.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log(step, 0, {"train/objective": -100.0 / step})
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(300, 2, generator=gen)
    made = [plots.training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png"),
            plots.latents_figure(z, z[:, [1, 0]] * 2, tmp_path / "latents.png"),
            plots.gap_kl_figure({"SumPooling": {"masked: gap": 0.001, "mixture: gap": 0.05,
                                                "masked: KL full": 0.1, "mixture: KL full": 2.0,
                                                "masked: KL single": 0.2, "mixture: KL single": 1.0}},
                                tmp_path / "gap.png")]
    for path in made:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
