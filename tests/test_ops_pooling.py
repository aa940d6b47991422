"""mmfast.ops.subset_sum_pool on every backend against a brute-force loop over subsets and
modalities (values, gradients, edge cases, dtypes)."""
from __future__ import annotations

import pytest
import torch

from _opcases import (F64, MASK_KINDS, assert_unchanged, cases, close, cotangent_like, generator,
                      gradcheck, grads, make_mask, mask_bank, nan_test_mask, randn, snapshot,
                      unused_modalities)
from conftest import DEVICE, require_backend
from mmfast.ops import subset_sum_pool

OP, MODULE = "subset_sum_pool", "subset_pool"

REFERENCE_SHAPES = [(B, M, D) for i, (M, D) in enumerate(
    (M, D) for M in (1, 2, 3, 5, 16) for D in (1, 17, 100)) for B in ((3, 7)[i % 2],)]
TRITON_SHAPES = [(3, 1, 17), (3, 3, 1), (5, 5, 17), (3, 16, 100)]


def brute_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[b, s] = Σ_{m ∈ subset s of row b} x[b, m]`` by explicit loops; differentiable."""
    B, M, D = x.shape
    rows = []
    for b, subsets in enumerate(mask_bank(mask)):
        pooled = []
        for members in subsets:
            acc = torch.zeros(D, dtype=x.dtype, device=x.device)
            for m in members:
                acc = acc + x[b, m]
            pooled.append(acc)
        rows.append(torch.stack(pooled))
    out = torch.stack(rows)
    return out if mask.dim() == 3 else out[:, 0]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("backend,B,M,D", cases(REFERENCE_SHAPES, TRITON_SHAPES), indirect=["backend"])
def test_values_and_gradients_match_brute_force(backend, B, M, D, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(B * 1000 + M * 10 + D)
    x = randn(B, M, D, gen=gen, requires_grad=True)
    mask = make_mask(kind, B, M, gen)
    before = snapshot(x, mask)

    out = subset_sum_pool(x, mask)
    assert out.shape == (*mask.shape[:-1], D)
    assert out.dtype == F64
    expected = brute_pool(x, mask)
    close(out, expected)

    g = cotangent_like(expected, gen)
    (grad_x,) = grads([out], [x], [g])
    (expected_grad,) = grads([expected], [x], [g])
    close(grad_x, expected_grad)
    assert_unchanged(before, (x, mask))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_gradcheck(backend, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(1)
    x = randn(3, 3, 2, gen=gen, requires_grad=True)
    mask = make_mask(kind, 3, 3, gen)
    assert gradcheck(lambda t: subset_sum_pool(t, mask), (x,), backend)


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_empty_full_and_single_modality(backend):
    require_backend(backend, OP, MODULE)
    gen = generator(2)
    x = randn(5, 1, 17, gen=gen, requires_grad=True)
    mask = torch.tensor([[True], [False], [True], [False], [True]], device=DEVICE)
    out = subset_sum_pool(x, mask)
    close(out[mask[:, 0]], x[mask[:, 0], 0])
    assert torch.equal(out[~mask[:, 0]], torch.zeros(2, 17, dtype=F64, device=DEVICE))
    g = cotangent_like(out, gen)
    (grad_x,) = grads([out], [x], [g])
    close(grad_x[:, 0], torch.where(mask, g, 0.0))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("kind", ["row_bank", "row"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(backend, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(3)
    x = randn(3, 5, 17, gen=gen, requires_grad=True)
    mask = torch.zeros((3, 4, 5) if kind == "row_bank" else (3, 5), dtype=torch.bool, device=DEVICE)
    out = subset_sum_pool(x, mask)
    assert torch.equal(out, torch.zeros_like(out))
    (grad_x,) = grads([out], [x], [cotangent_like(out, gen)])
    assert torch.equal(grad_x, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_nan_in_unused_modalities_does_not_leak(backend, kind):
    require_backend(backend, OP, MODULE)
    gen = generator(4)
    B, M, D = 5, 5, 17
    mask = nan_test_mask(kind, B, M, gen)
    unused = unused_modalities(mask)
    assert unused.any()
    clean = randn(B, M, D, gen=gen)
    x = torch.where(unused.unsqueeze(-1), float("nan"), clean).requires_grad_(True)
    out = subset_sum_pool(x, mask)
    close(out, brute_pool(clean, mask))
    (grad_x,) = grads([out], [x], [cotangent_like(out, gen)])
    assert torch.isfinite(grad_x).all()
    assert torch.equal(grad_x[unused], torch.zeros_like(grad_x[unused]))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("shared", [True, False])
def test_non_finite_modality_only_reaches_the_subsets_holding_it(backend, shared):
    """inf in modality 1 and NaN in modality 3, each in some subsets of a row and not in
    others: a subset without them is exactly the clean sum; the gradient does not depend on
    the values at all."""
    require_backend(backend, OP, MODULE)
    gen = generator(7)
    B, M, D = 3, 4, 17
    bank = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]],
                        dtype=torch.bool, device=DEVICE)
    mask = bank.expand(B, 4, M) if shared else bank.repeat(B, 1, 1)
    clean = randn(B, M, D, gen=gen)
    bad = clean.clone()
    bad[:, 1] = float("inf")
    bad[:, 3] = float("nan")
    x = bad.requires_grad_(True)
    out = subset_sum_pool(x, mask)
    expected = brute_pool(clean, mask)
    close(out[:, 1], expected[:, 1])                       # neither inf nor NaN in subset 1
    assert torch.isfinite(out[:, 1]).all()
    assert torch.isposinf(out[:, 0]).all()                 # inf only
    assert torch.isnan(out[:, 2:]).all()                   # NaN in subsets 2 and 3
    g = cotangent_like(out, gen)
    (grad_x,) = grads([out], [x], [g])
    xe = clean.clone().requires_grad_(True)
    (expected_grad,) = grads([brute_pool(xe, mask)], [xe], [g])
    assert torch.isfinite(grad_x).all()
    close(grad_x, expected_grad)

@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_shared_bank_equals_materialised_bank(backend):
    require_backend(backend, OP, MODULE)
    gen = generator(5)
    x = randn(7, 3, 17, gen=gen)
    shared = make_mask("shared_bank", 7, 3, gen)
    close(subset_sum_pool(x, shared), subset_sum_pool(x, shared.contiguous()))


@pytest.mark.parametrize("backend,dtype", cases(
    [torch.float32, torch.float16, torch.bfloat16],
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]),
    indirect=["backend"])
def test_low_precision_inputs(backend, dtype):
    require_backend(backend, OP, MODULE)
    gen = generator(6)
    x = randn(5, 16, 100, gen=gen, dtype=dtype, requires_grad=True)
    mask = make_mask("shared_bank", 5, 16, gen)
    out = subset_sum_pool(x, mask)
    assert out.dtype == dtype and out.shape == (5, mask.shape[1], 100)
    close(out, brute_pool(x.detach().to(F64), mask), dtype)
    g = cotangent_like(out, gen)
    (grad_x,) = torch.autograd.grad(out, x, g)
    assert grad_x.dtype == dtype
    xe = x.detach().to(F64).requires_grad_(True)
    (expected,) = torch.autograd.grad(brute_pool(xe, mask), xe, g.to(F64))
    close(grad_x, expected, dtype, scale=4.0)
