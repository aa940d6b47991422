"""Mean correlation coefficient (MCC) between true and inferred latents.

The absolute Pearson correlations between every true and every inferred coordinate are matched
one-to-one to maximise their sum (the Hungarian method, exact, O(n³)); MCC is the mean of the
matched correlations. 1 means the latents are recovered up to permutation, sign and scale.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def linear_assignment(cost: list[list[float]]) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment of the rows of ``cost`` (n x m, n <= m) to columns.

    The Hungarian method with potentials (Kuhn-Munkres, as in the shortest augmenting path
    formulation). Returns the ``(row, column)`` pairs, one per row.
    """
    n = len(cost)
    m = len(cost[0]) if n else 0
    if n > m:
        pairs = linear_assignment([list(col) for col in zip(*cost)])
        return sorted((r, c) for c, r in pairs)
    INF = math.inf
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    match = [0] * (m + 1)          # match[j] = row (1-based) assigned to column j
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = [INF] * (m + 1)
        used = [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], INF, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    return sorted((match[j] - 1, j - 1) for j in range(1, m + 1) if match[j])


def correlation_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlations between the columns of ``a [N, p]`` and ``b [N, q]``: ``[p, q]``."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    a = a / a.norm(dim=0).clamp_min(1e-12)
    b = b / b.norm(dim=0).clamp_min(1e-12)
    return a.T @ b


def mcc(z_true: Tensor, z_inferred: Tensor) -> float:
    """MCC of ``z_inferred [N, q]`` against ``z_true [N, p]`` (mean over min(p, q) matches)."""
    if z_true.dim() != 2 or z_inferred.dim() != 2 or z_true.shape[0] != z_inferred.shape[0]:
        raise ValueError(f"mcc: z_true {list(z_true.shape)} and z_inferred {list(z_inferred.shape)} "
                         f"must be [N, p] and [N, q] with the same N")
    corr = correlation_matrix(z_true, z_inferred).abs()
    pairs = linear_assignment((-corr).tolist())
    return float(sum(corr[i, j] for i, j in pairs) / len(pairs))
