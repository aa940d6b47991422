"""mmfast.ops.subset_attention on every backend against a brute-force loop over rows, subsets,
query tokens and heads (values, gradients, edge cases, dtypes)."""
from __future__ import annotations

import math

import pytest
import torch

from _opcases import (F64, MASK_KINDS, TOLERANCE, assert_unchanged, cases, close, cotangent_like,
                      generator, gradcheck, grads, make_mask, mask_bank, nan_test_mask, randn,
                      snapshot, unused_modalities)
from conftest import DEVICE, require_backend
from mmfast.ops import subset_attention

OP, MODULE = "subset_attention", "subset_attention"

# (B, M, E, H): head dims Dh = E / H in {1, 17, 100} for every M of the contract.
HEADS = ((2, 2), (34, 2), (100, 1))
REFERENCE_SHAPES = [(B, M, E, H) for i, (M, (E, H)) in enumerate(
    (M, eh) for M in (1, 2, 3, 5, 16) for eh in HEADS) for B in ((3, 5)[i % 2],)]
TRITON_SHAPES = [(3, 1, 17, 1), (3, 3, 34, 2), (2, 5, 8, 2), (2, 16, 16, 4)]


def brute_attention(q, k, v, mask, num_heads: int, scale: float) -> torch.Tensor:
    """For every row b, subset s, query token i in s and head h: a softmax over the keys of
    the tokens in s, written out with exp and a sum; tokens outside s get zero rows."""
    B, M, E = q.shape
    dh = E // num_heads
    zero_row = q.new_zeros(E)
    out = []
    for b, subsets in enumerate(mask_bank(mask)):
        per_subset = []
        for members in subsets:
            keys = torch.tensor(members, dtype=torch.long, device=q.device)
            rows = []
            for i in range(M):
                if i not in members:
                    rows.append(zero_row)
                    continue
                heads = []
                for h in range(num_heads):
                    cols = slice(h * dh, (h + 1) * dh)
                    scores = (q[b, i, cols] * k[b, keys, cols]).sum(-1) * scale      # [|s|]
                    weights = torch.exp(scores - scores.max().detach())
                    weights = weights / weights.sum()
                    heads.append((weights[:, None] * v[b, keys, cols]).sum(0))
                rows.append(torch.cat(heads))
            per_subset.append(torch.stack(rows))
        out.append(torch.stack(per_subset))
    out = torch.stack(out)
    return out if mask.dim() == 3 else out[:, 0]


def qkv(B, M, E, gen, dtype=F64, requires_grad=False, nan_at=None):
    tensors = []
    for _ in range(3):
        t = randn(B, M, E, gen=gen, dtype=dtype)
        if nan_at is not None:
            t = torch.where(nan_at.unsqueeze(-1), float("nan"), t)
        tensors.append(t.requires_grad_(requires_grad))
    return tensors


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("backend,B,M,E,H", cases(REFERENCE_SHAPES, TRITON_SHAPES),
                         indirect=["backend"])
def test_values_and_gradients_match_brute_force(backend, B, M, E, H, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(B * 1000 + M * 10 + E + H)
    q, k, v = qkv(B, M, E, gen, requires_grad=True)
    mask = make_mask(kind, B, M, gen, max_subsets=8 if backend == "reference" else 4)
    before = snapshot(q, k, v, mask)

    out = subset_attention(q, k, v, mask, H)
    assert out.shape == (*mask.shape[:-1], M, E) and out.dtype == F64
    expected = brute_attention(q, k, v, mask, H, 1.0 / math.sqrt(E // H))
    close(out, expected)

    g = cotangent_like(expected, gen)
    for got, want in zip(grads([out], [q, k, v], [g]), grads([expected], [q, k, v], [g])):
        close(got, want)
    assert_unchanged(before, (q, k, v, mask))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_explicit_scale(backend):
    require_backend(backend, OP, MODULE)
    gen = generator(21)
    q, k, v = qkv(3, 5, 12, gen)
    mask = make_mask("row_bank", 3, 5, gen)
    close(subset_attention(q, k, v, mask, 3, scale=0.37), brute_attention(q, k, v, mask, 3, 0.37))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_gradcheck(backend, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(22)
    q, k, v = qkv(2, 3, 4, gen, requires_grad=True)
    mask = make_mask(kind, 2, 3, gen)
    assert gradcheck(lambda a, b, c: subset_attention(a, b, c, mask, 2), (q, k, v), backend)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_singleton_subset_returns_its_value(backend):
    """A token alone in its subset attends only to itself: its output row is its value."""
    require_backend(backend, OP, MODULE)
    gen = generator(23)
    B, M, E = 3, 5, 8
    q, k, v = qkv(B, M, E, gen)
    bank = torch.eye(M, dtype=torch.bool, device=DEVICE)                     # every singleton
    out = subset_attention(q, k, v, bank.expand(B, M, M), 2)
    for m in range(M):
        close(out[:, m, m], v[:, m])
        others = [i for i in range(M) if i != m]
        assert torch.equal(out[:, m, others], torch.zeros_like(out[:, m, others]))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("kind", ["row", "row_bank"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(backend, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(24)
    q, k, v = qkv(3, 5, 8, gen, requires_grad=True)
    mask = torch.zeros((3, 4, 5) if kind == "row_bank" else (3, 5), dtype=torch.bool, device=DEVICE)
    out = subset_attention(q, k, v, mask, 2)
    assert torch.equal(out, torch.zeros_like(out))
    for g in grads([out], [q, k, v], [cotangent_like(out, gen)]):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_nan_in_unused_tokens_does_not_leak(backend, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(25)
    B, M, E, H = 4, 5, 8, 2
    mask = nan_test_mask(kind, B, M, gen)
    unused = unused_modalities(mask)
    assert unused.any()
    q, k, v = qkv(B, M, E, gen, nan_at=unused, requires_grad=True)
    clean = [torch.where(unused.unsqueeze(-1), 0.0, t.detach()) for t in (q, k, v)]
    out = subset_attention(q, k, v, mask, H)
    close(out, brute_attention(*clean, mask, H, 1.0 / math.sqrt(E // H)))
    for g in grads([out], [q, k, v], [cotangent_like(out, gen)]):
        assert torch.isfinite(g).all()
        assert torch.equal(g[unused], torch.zeros_like(g[unused]))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_large_scores_are_stable(backend):
    """Scores of several hundred: a max-subtracted softmax, no overflow."""
    require_backend(backend, OP, MODULE)
    gen = generator(26)
    q, k, v = qkv(3, 5, 8, gen)
    q, k = q * 30.0, k * 30.0
    mask = make_mask("shared_bank", 3, 5, gen)
    out = subset_attention(q, k, v, mask, 2)
    assert torch.isfinite(out).all()
    close(out, brute_attention(q, k, v, mask, 2, 0.5), scale=10.0)


@pytest.mark.parametrize("backend,dtype", cases(
    [torch.float32, torch.float16, torch.bfloat16],
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]),
    indirect=["backend"])
def test_low_precision_inputs(backend, dtype):
    require_backend(backend, OP, MODULE)
    gen = generator(27)
    B, M, E, H = 3, 5, 32, 2
    q, k, v = qkv(B, M, E, gen, dtype=dtype, requires_grad=True)
    mask = make_mask("row_bank", B, M, gen)
    out = subset_attention(q, k, v, mask, H)
    assert out.dtype == dtype and out.shape == (B, mask.shape[1], M, E)
    wide = [t.detach().to(F64).requires_grad_(True) for t in (q, k, v)]
    expected = brute_attention(*wide, mask, H, 1.0 / math.sqrt(E // H))
    close(out, expected, dtype)
    g = cotangent_like(out, gen)
    got = grads([out], [q, k, v], [g])
    want = grads([expected], wide, [g])
    rtol, atol = TOLERANCE[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.to(F64), b, rtol=rtol, atol=4 * atol)
