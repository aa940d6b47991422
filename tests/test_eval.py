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
