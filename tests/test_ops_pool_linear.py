"""mmfast.ops.subset_pool_linear on both backends against a float64 brute force of
``out[b, s] = W · Σ_{m ∈ S_bs} g[b, m] + bias`` (values and the gradients of g, W and bias).

On the triton backend the op takes one of two routes by cost (transform the M rows then pool
with the kernel, or pool with the kernel then transform the S rows); both are exercised.
"""
from __future__ import annotations


import pytest
import torch

import mmfast
from conftest import DEVICE
from _seeded import all_subsets_bank, randn, random_mask
from mmfast.ops import subset_pool_linear
from mmfast.ops.pool_linear import transform_first

F64 = torch.float64
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4),
       torch.float16: (1e-2, 2e-2), torch.bfloat16: (5e-2, 1e-1)}


def brute(g, mask, weight, bias):
    """Loops over rows, subsets and modalities, then one matrix-vector product per subset."""
    B, M, D = g.shape
    bank = (mask if mask.dim() == 3 else mask.unsqueeze(1)).cpu().tolist()
    rows = []
    for b in range(B):
        outs = []
        for subset in bank[b]:
            pooled = torch.zeros(D, dtype=F64, device=g.device)
            for m in range(M):
                if subset[m]:
                    pooled = pooled + g[b, m]
            out = weight @ pooled
            outs.append(out if bias is None else out + bias)
        rows.append(torch.stack(outs) if outs else torch.zeros(0, weight.shape[0], dtype=F64))
    out = torch.stack(rows)
    return out if mask.dim() == 3 else out[:, 0]


def check(backend, g, mask, weight, bias, seed):
    dtype = g.dtype
    leaves = [t.detach().clone().requires_grad_(True) for t in (g, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_(True))
    with mmfast.use_backend(backend):
        out = subset_pool_linear(leaves[0], mask, leaves[1],
                                 leaves[2] if bias is not None else None)
    leaves64 = [t.detach().to(F64).requires_grad_(True) for t in leaves]
    expected = brute(leaves64[0], mask, leaves64[1], leaves64[2] if bias is not None else None)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    rtol, atol = TOL[dtype]
    scale = (g.shape[1] * g.shape[2]) ** 0.5
    torch.testing.assert_close(out.to(F64), expected.detach(), rtol=rtol, atol=atol * scale)

    cot = randn(*expected.shape, seed=seed) * 1.3 + 0.2
    with mmfast.use_backend(backend):
        got = torch.autograd.grad(out, leaves, cot.to(dtype))
    if expected.requires_grad:
        want = torch.autograd.grad(expected, leaves64, cot)
    else:                                   # no subset at all: nothing depends on the inputs
        want = [torch.zeros_like(t) for t in leaves64]
    rows = out.numel() // max(1, out.shape[-1])
    for name, a, e in zip(("g", "weight", "bias"), got, want):
        assert a.shape == e.shape and a.dtype == dtype, name
        torch.testing.assert_close(a.to(F64), e, rtol=rtol, atol=atol * (scale + rows) ** 0.5 * 4,
                                   msg=lambda m: f"gradient of {name}: {m}")


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    return request.param


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("B,M,D,O", [(5, 3, 17, 9), (3, 1, 1, 1), (4, 5, 100, 7)])
def test_per_row_masks_pool_first(backend, B, M, D, O, with_bias):
    assert not transform_first(1, M, D, O)
    mask = random_mask(B, M, seed=1)
    mask[0] = False
    mask[1] = True
    check(backend, randn(B, M, D, seed=2), mask, randn(O, D, seed=3),
          randn(O, seed=4) if with_bias else None, seed=5)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("M,D,O", [(3, 17, 9), (5, 40, 11)])
def test_shared_bank_transform_first(backend, M, D, O, with_bias):
    """Every subset (empty and full included) as a stride-0 bank: 2^M > M, the rows are
    transformed first on the triton backend."""
    bank = all_subsets_bank(M)
    assert transform_first(bank.shape[0], M, D, O)
    mask = bank.expand(3, *bank.shape)
    check(backend, randn(3, M, D, seed=11), mask, randn(O, D, seed=12),
          randn(O, seed=13) if with_bias else None, seed=14)


def test_per_row_bank_both_routes(backend):
    g, W, b = randn(4, 6, 20, seed=21), randn(5, 20, seed=22), randn(5, seed=23)
    few = random_mask(4, 2, 6, seed=24)            # 2 subsets of 6: pool first
    many = random_mask(4, 12, 6, seed=25)          # 12 subsets of 6: transform first
    many[0] = False
    assert not transform_first(2, 6, 20, 5) and transform_first(12, 6, 20, 5)
    check(backend, g, few, W, b, seed=26)
    check(backend, g, many, W, b, seed=27)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    mask = all_subsets_bank(4).expand(3, 16, 4)
    check(backend, randn(3, 4, 24, seed=31, dtype=dtype), mask,
          randn(6, 24, seed=32, dtype=dtype) * 0.3, randn(6, seed=33, dtype=dtype), seed=34)


def test_transform_first_rule():
    """Multiply-adds per row: M·D·out + S·M·out for transform-then-pool against
    S·M·D + S·D·out for pool-then-transform."""
    assert transform_first(255, 8, 512, 256)       # a full bank: M rows, not 255
    assert not transform_first(1, 8, 512, 256)     # one subset per row: pool first
    assert not transform_first(4, 8, 512, 256)     # fewer subsets than modalities
    # S = M: the matmul costs the same either way; pooling out < D wide rows is cheaper.
    assert transform_first(8, 8, 512, 256)
    assert not transform_first(8, 8, 256, 512)


@pytest.mark.parametrize("kind", ["row", "bank"])
def test_unused_modalities_never_leak(backend, kind):
    """NaN/inf in modalities outside every subset of a row: finite values and gradients (the
    gradient of W too, which multiplies the rows of g)."""
    g = randn(4, 5, 8, seed=41)
    mask = random_mask(4, 9, 5, seed=42) if kind == "bank" else random_mask(4, 5, seed=42)
    mask[..., 4] = False
    mask[2:, ..., 1] = False
    bad = g.clone()
    bad[:, 4] = float("nan")
    bad[2:, 1] = float("inf")
    W = randn(3, 8, seed=43).requires_grad_(True)
    b = randn(3, seed=44).requires_grad_(True)
    x = bad.clone().requires_grad_(True)
    with mmfast.use_backend(backend):
        out = subset_pool_linear(x, mask, W, b)
        grads = torch.autograd.grad(out.sum(), (x, W, b))
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(out, brute(g, mask, W.detach(), b.detach()))
    assert torch.equal(grads[0][:, 4], torch.zeros_like(grads[0][:, 4]))


def test_empty_bank(backend):
    g, W, b = randn(2, 3, 4, seed=51), randn(5, 4, seed=52), randn(5, seed=53)
    check(backend, g, torch.zeros(2, 0, 3, dtype=torch.bool, device=DEVICE), W, b, seed=54)


def test_gradcheck(backend):
    g = randn(2, 3, 4, seed=61).requires_grad_(True)
    W = randn(2, 4, seed=62).requires_grad_(True)
    b = randn(2, seed=63).requires_grad_(True)
    bank = all_subsets_bank(3).expand(2, 8, 3)
    with mmfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: subset_pool_linear(t[0], bank, t[1], t[2]),
                                        (g, W, b))
        assert torch.autograd.gradcheck(lambda *t: subset_pool_linear(t[0], bank[:, 6], t[1]),
                                        (g, W))


def test_inputs_not_mutated(backend):
    g, W, b = randn(3, 4, 5, seed=71), randn(2, 5, seed=72), randn(2, seed=73)
    mask = random_mask(3, 7, 4, seed=74)
    before = [t.clone() for t in (g, W, b, mask)]
    with mmfast.use_backend(backend):
        subset_pool_linear(g, mask, W, b)
    assert all(torch.equal(x, y) for x, y in zip(before, (g, W, b, mask)))


def test_bad_inputs_name_the_argument():
    g, W, b = randn(2, 3, 4, seed=81), randn(5, 4, seed=82), randn(5, seed=83)
    mask = random_mask(2, 3, seed=84)
    with pytest.raises(ValueError, match="g has shape"):
        subset_pool_linear(g[0], mask, W, b)
    with pytest.raises(ValueError, match=r"weight has shape \[5, 3\]"):
        subset_pool_linear(g, mask, W[:, :3], b)
    with pytest.raises(ValueError, match=r"bias has shape \[4\]"):
        subset_pool_linear(g, mask, W, b[:4])
    with pytest.raises(TypeError, match="mask has dtype"):
        subset_pool_linear(g, mask.float(), W, b)
    with pytest.raises(ValueError, match="mask has shape"):
        subset_pool_linear(g, mask[:, :2], W, b)
    with pytest.raises(TypeError, match="dtypes"):
        subset_pool_linear(g, mask, W.float(), b)


def test_fake_and_autograd_registrations():
    """The custom op pair has consistent fake (meta) kernels and autograd registration, so it
    traces under torch.compile."""
    g, W, b = randn(2, 3, 4, seed=91), randn(5, 4, seed=92), randn(5, seed=93)
    bank = all_subsets_bank(3).expand(2, 8, 3)
    for args in ((g, bank, W, b), (g, bank[:, 2], W, None)):
        args = tuple(t.requires_grad_(True) if t is not None and t.is_floating_point() else t
                     for t in args)
        torch.library.opcheck(torch.ops.mmfast.subset_pool_linear.default, args,
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_bank_against_float64(dtype):
    B, M, D, O = 256, 8, 256, 128
    bank = all_subsets_bank(M)[1:].expand(B, 255, M)
    g = randn(B, M, D, seed=101, dtype=dtype)
    W = (randn(O, D, seed=102) / D ** 0.5).to(dtype)
    b = randn(O, seed=103, dtype=dtype)
    with mmfast.use_backend("triton"):
        out = subset_pool_linear(g, bank, W, b)
    expected = torch.einsum("sm,bmd->bsd", bank[0].to(F64), g.to(F64)) @ W.to(F64).t() + b.to(F64)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.to(F64), expected, rtol=rtol, atol=atol * 3)
