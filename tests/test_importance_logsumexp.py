"""mmfast.ops.importance_logsumexp on both backends (the triton one through the interpreter
without a GPU) against the definition ``log((1/K) Σ_k exp(w_k))`` evaluated column by column
with Python's exactly rounded ``math.fsum``, and its gradient, the softmax over K, written out."""
from __future__ import annotations

import math

import pytest
import torch

import mmfast
from conftest import DEVICE, require_backend
from mmfast.kernels import iwae as kernel
from mmfast.ops import importance_logsumexp

F64 = torch.float64


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    require_backend(request.param, "importance_logsumexp", "iwae")
    with mmfast.use_backend(request.param):
        yield request.param


def log_mean_exp_columns(w: torch.Tensor) -> torch.Tensor:
    """``[K, *batch] -> [*batch]`` by the definition, one column at a time (shifted by its max)."""
    K = w.shape[0]
    cols = w.detach().to(F64).reshape(K, -1).t().tolist()
    out = []
    for col in cols:
        top = max(col)
        if top == -math.inf:
            out.append(-math.inf)
            continue
        out.append(top + math.log(math.fsum(math.exp(v - top) for v in col)) - math.log(K))
    return torch.tensor(out, dtype=F64).reshape(w.shape[1:])


def softmax_columns(w: torch.Tensor) -> torch.Tensor:
    """``∂ out / ∂ w`` = exp(w_k − logsumexp w): the definition again, column by column."""
    lse = log_mean_exp_columns(w) + math.log(w.shape[0])
    return torch.exp(w.detach().cpu().to(F64) - lse)


@pytest.mark.parametrize("shape", [(1, 4), (5, 3, 2), (64, 7), (5,), (33, 2, 3, 2)])
def test_matches_the_definition(backend, shape):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)), dtype=F64) * 20
         ).to(DEVICE).requires_grad_(True)
    before = w.detach().clone()
    out = importance_logsumexp(w)
    assert out.shape == shape[1:] and out.dtype == F64
    torch.testing.assert_close(out.cpu(), log_mean_exp_columns(w), rtol=1e-12, atol=1e-12)
    g = torch.randn(shape[1:], generator=torch.Generator().manual_seed(9), dtype=F64).to(DEVICE)
    (grad,) = torch.autograd.grad(out, w, g)
    torch.testing.assert_close(grad.cpu(), softmax_columns(w) * g.cpu(), rtol=1e-12, atol=1e-14)
    assert torch.equal(w.detach(), before)


def test_chunked_over_k_and_columns(backend, monkeypatch):
    """Tiles of 16 elements: K = 37 spans several chunks of the online log-sum-exp."""
    monkeypatch.setattr(kernel, "element_budget", lambda: 16)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(2))
    w = torch.linspace(-300, 300, 37 * 6, dtype=F64).reshape(37, 6)[order]
    w = w.to(DEVICE).requires_grad_(True)
    out = importance_logsumexp(w)
    torch.testing.assert_close(out.cpu(), log_mean_exp_columns(w), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), w)
    torch.testing.assert_close(grad.cpu(), softmax_columns(w), rtol=1e-12, atol=1e-14)


def test_extreme_and_zero_weights(backend):
    """Weights near ±1e4 stay finite; −inf entries (zero weight) get a zero gradient."""
    w = torch.tensor([[-1e4, 1e4, -math.inf], [-1e4 - 1.0, 1e4 - 50.0, 0.0],
                      [-math.inf, 9e3, -math.inf]], dtype=F64, device=DEVICE, requires_grad=True)
    out = importance_logsumexp(w)
    torch.testing.assert_close(out.cpu(), log_mean_exp_columns(w), rtol=1e-12, atol=1e-9)
    (grad,) = torch.autograd.grad(out.sum(), w)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.cpu(), softmax_columns(w), rtol=1e-12, atol=1e-14)
    assert grad[2, 0] == 0 and grad[0, 2] == 0 and grad[2, 2] == 0


def test_non_contiguous_input(backend):
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(3), dtype=F64).to(DEVICE)
    w = base.t()[::2].requires_grad_(False)                       # [4, 6], strided
    torch.testing.assert_close(importance_logsumexp(w).cpu(), log_mean_exp_columns(w),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_accumulates_in_float32(backend, dtype):
    w = (torch.randn(9, 5, generator=torch.Generator().manual_seed(4)) * 5).to(DEVICE, dtype)
    w.requires_grad_(True)
    out = importance_logsumexp(w)
    assert out.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out.cpu().to(F64), log_mean_exp_columns(w), rtol=tol, atol=tol)
    (grad,) = torch.autograd.grad(out.sum(), w)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.cpu().to(F64), softmax_columns(w), rtol=tol, atol=tol)


def test_gradcheck(backend):
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=F64).to(DEVICE)
    assert torch.autograd.gradcheck(importance_logsumexp, (w.requires_grad_(True),),
                                    fast_mode=backend == "triton")


def test_rejects_bad_input():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        importance_logsumexp([1.0, 2.0])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        importance_logsumexp(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"w has shape \[0, 4\]"):
        importance_logsumexp(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"w has shape \[\]"):
        importance_logsumexp(torch.tensor(1.0))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_low_precision_and_determinism(dtype):
    w = (torch.randn(1000, 4096, generator=torch.Generator().manual_seed(6)) * 30).to(DEVICE, dtype)
    w.requires_grad_(True)
    with mmfast.use_backend("triton"):
        out = importance_logsumexp(w)
        (grad,) = torch.autograd.grad(out.sum(), w)
        for _ in range(20):
            again = importance_logsumexp(w)
            assert torch.equal(again, out)
            assert torch.equal(torch.autograd.grad(again.sum(), w)[0], grad)
    wide = w.detach().double()
    torch.testing.assert_close(out.double(), torch.logsumexp(wide, 0) - math.log(1000),
                               rtol=1e-5, atol=1e-3)
