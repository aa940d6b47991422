"""The four observation likelihoods of mmfast.ops on every backend against torch.distributions
and explicit formulas (values, gradients under random upstream gradients, broadcast log-scales,
extreme logits and scales, dtypes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Laplace, Normal

from _opcases import (F64, assert_unchanged, cases, close, cotangent_like, generator, gradcheck,
                      grads, randn, snapshot, uniform)
from conftest import DEVICE, require_backend
from mmfast.ops import bernoulli_log_prob, categorical_log_prob, laplace_log_prob, normal_log_prob

MODULE = "likelihoods"

# (K, B, event)
REFERENCE_SHAPES = [(K, B, event) for K in (1, 5) for B, event in
                    ((3, ()), (7, (1,)), (3, (17,)), (5, (100,)), (3, (2, 3, 5)))]
TRITON_SHAPES = [(1, 3, (17,)), (5, 3, ()), (2, 3, (2, 3, 5))]


def sum_event(t: torch.Tensor) -> torch.Tensor:
    """``[K, B, *event] -> [K, B]`` by an explicit loop over the event positions."""
    total = torch.zeros(t.shape[:2], dtype=t.dtype, device=t.device)
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in t.shape[2:]]).reshape(
            -1, t.dim() - 2).tolist() if t.dim() > 2 else [[]]:
        total = total + t[(slice(None), slice(None), *pos)]
    return total


def soft_targets(B, event, gen):
    x = uniform(B, *event, gen=gen, low=0.0, high=1.0)
    flat = x.view(-1)
    flat[::3] = 0.0      # hard labels too
    flat[1::5] = 1.0
    return x


# ---------------------------------------------------------------------------------- bernoulli

@pytest.mark.parametrize("backend,K,B,event", cases(REFERENCE_SHAPES, TRITON_SHAPES),
                         indirect=["backend"])
def test_bernoulli(backend, K, B, event):
    require_backend(backend, "bernoulli_log_prob", MODULE)
    gen = generator(K * 100 + B + len(event))
    logits = randn(K, B, *event, gen=gen, scale=3.0, requires_grad=True)
    x = soft_targets(B, event, gen).requires_grad_(True)
    before = snapshot(logits, x)
    out = bernoulli_log_prob(logits, x)
    assert out.shape == (K, B) and out.dtype == F64
    expected = sum_event(x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits))
    close(out, expected)
    g = cotangent_like(out, gen)
    for got, want in zip(grads([out], [logits, x], [g]), grads([expected], [logits, x], [g])):
        close(got, want)
    assert_unchanged(before, (logits, x))


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_bernoulli_extreme_logits(backend):
    require_backend(backend, "bernoulli_log_prob", MODULE)
    logits = torch.tensor([[[-100.0, -30.0, 0.0, 30.0, 100.0]]], dtype=F64, device=DEVICE)
    logits = logits.expand(2, 3, 5).contiguous().requires_grad_(True)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0, 0.0], [0.3] * 5],
                     dtype=F64, device=DEVICE)
    out = bernoulli_log_prob(logits, x)
    expected = sum_event(x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    torch.testing.assert_close(grad, (x - torch.sigmoid(logits)).detach())


# -------------------------------------------------------------------------------- categorical

CATEGORICAL_REFERENCE = [(K, B, event, C) for (K, B, event) in REFERENCE_SHAPES[:5]
                         for C in (1, 3, 71)] + [(5, 3, (8,), 256)]
CATEGORICAL_TRITON = [(1, 3, (8,), 71), (5, 3, (), 3), (2, 3, (2, 3), 256)]


@pytest.mark.parametrize("backend,K,B,event,C", cases(CATEGORICAL_REFERENCE, CATEGORICAL_TRITON),
                         indirect=["backend"])
def test_categorical(backend, K, B, event, C):
    require_backend(backend, "categorical_log_prob", MODULE)
    gen = generator(K * 1000 + B * 10 + C + len(event))
    logits = randn(K, B, *event, C, gen=gen, scale=2.0, requires_grad=True)
    target = torch.randint(0, C, (B, *event), generator=gen).to(DEVICE)
    before = snapshot(logits, target)
    out = categorical_log_prob(logits, target)
    assert out.shape == (K, B) and out.dtype == F64
    expected = sum_event(Categorical(logits=logits).log_prob(target.expand(K, B, *event)))
    close(out, expected)
    g = cotangent_like(out, gen)
    close(grads([out], [logits], [g])[0], grads([expected], [logits], [g])[0])
    assert_unchanged(before, (logits, target))


@pytest.mark.parametrize("bad", [7, -1])
@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_categorical_out_of_range_class(backend, bad):
    """A class index outside [0, C): a ValueError for CPU tensors; on a GPU, where checking
    would synchronise every call, NaN in exactly the rows b that hold it, on both backends
    (the reference must not gather out of bounds), and the other rows unchanged."""
    require_backend(backend, "categorical_log_prob", MODULE)
    gen = generator(43)
    logits = randn(2, 3, 4, 7, gen=gen)
    target = torch.randint(0, 7, (3, 4), generator=gen)
    target[1, 2] = bad
    target = target.to(DEVICE)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match=r"class indices in \[-?\d+, \d+\]; expected values "
                                             r"in \[0, 7\)"):
            categorical_log_prob(logits, target)
        return
    out = categorical_log_prob(logits, target)
    assert torch.isnan(out[:, 1]).all()
    keep = [0, 2]
    expected = sum_event(Categorical(logits=logits[:, keep]).log_prob(
        target[keep].expand(2, 2, 4)))
    close(out[:, keep], expected)


def test_categorical_reference_marks_out_of_range_rows_nan():
    """The reference itself (what the op runs on a GPU without the check) on the CPU: NaN rows,
    no out-of-bounds gather, the other rows exact."""
    from mmfast.ops import reference as ref
    gen = generator(44)
    logits = randn(2, 3, 4, 7, gen=gen)
    target = torch.randint(0, 7, (3, 4), generator=gen)
    target[0, 1], target[2, 3] = 7, -3
    out = ref.categorical_log_prob(logits, target.to(DEVICE))
    assert torch.isnan(out[:, [0, 2]]).all()
    close(out[:, 1], sum_event(Categorical(logits=logits[:, 1:2]).log_prob(
        target[1:2].to(DEVICE).expand(2, 1, 4)))[:, 0])


@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_categorical_extreme_logits(backend):
    require_backend(backend, "categorical_log_prob", MODULE)
    gen = generator(41)
    logits = (randn(2, 3, 8, 71, gen=gen).sign() * 100.0).requires_grad_(True)
    target = torch.randint(0, 71, (3, 8), generator=gen).to(DEVICE)
    out = categorical_log_prob(logits, target)
    expected = sum_event(Categorical(logits=logits).log_prob(target.expand(2, 3, 8)))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-9)
    g = cotangent_like(out, gen)
    got, want = grads([out], [logits], [g])[0], grads([expected], [logits], [g])[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- normal, laplace

def log_scale_of(kind: str, K, B, event, gen, low=-1.0, high=1.0):
    """log_scale arguments that broadcast to loc ``[K, B, *event]``."""
    shape = {"full": (K, B, *event), "event": event, "scalar": (), "per_row": (1, B) + (1,) * len(event)}
    if kind == "float":
        return 0.3
    return uniform(*shape[kind], gen=gen, low=low, high=high, requires_grad=True)


LOCATION_SCALE = {
    "normal": (normal_log_prob, Normal),
    "laplace": (laplace_log_prob, Laplace),
}


@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("scale_kind", ["full", "event", "scalar", "per_row", "float"])
@pytest.mark.parametrize("backend,K,B,event", cases(REFERENCE_SHAPES, TRITON_SHAPES),
                         indirect=["backend"])
def test_location_scale(backend, K, B, event, scale_kind, family):
    op, dist = LOCATION_SCALE[family]
    require_backend(backend, f"{family}_log_prob", MODULE)
    gen = generator(K * 100 + B + len(event) + len(scale_kind))
    loc = randn(K, B, *event, gen=gen, requires_grad=True)
    log_scale = log_scale_of(scale_kind, K, B, event, gen)
    x = randn(B, *event, gen=gen, scale=1.3, requires_grad=True)
    leaves = [loc, x] + ([log_scale] if isinstance(log_scale, torch.Tensor) else [])
    before = snapshot(*leaves)
    for min_scale in (0.0, 0.05):
        out = op(loc, log_scale, x, min_scale=min_scale)
        assert out.shape == (K, B) and out.dtype == F64
        scale = min_scale + torch.exp(torch.as_tensor(log_scale, dtype=F64, device=DEVICE))
        expected = sum_event(dist(loc, scale).log_prob(x))
        close(out, expected)
        g = cotangent_like(out, gen)
        for got, want in zip(grads([out], leaves, [g]), grads([expected], leaves, [g])):
            assert got.shape == want.shape
            close(got, want)
    assert_unchanged(before, leaves)


@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
def test_location_scale_extreme_scales(backend, family):
    op, dist = LOCATION_SCALE[family]
    require_backend(backend, f"{family}_log_prob", MODULE)
    gen = generator(42)
    loc = randn(2, 3, 17, gen=gen, requires_grad=True)
    log_scale = uniform(2, 3, 17, gen=gen, low=-10.0, high=10.0, requires_grad=True)
    x = randn(3, 17, gen=gen, requires_grad=True)
    out = op(loc, log_scale, x)
    expected = sum_event(dist(loc, torch.exp(log_scale)).log_prob(x))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-6)
    g = cotangent_like(out, gen)
    for got, want in zip(grads([out], [loc, log_scale, x], [g]),
                         grads([expected], [loc, log_scale, x], [g])):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-6)


# ------------------------------------------------------------------------------ gradcheck, dtypes

@pytest.mark.parametrize("backend", ["reference", "triton"], indirect=True)
@pytest.mark.parametrize("op", ["bernoulli_log_prob", "categorical_log_prob", "normal_log_prob",
                                "laplace_log_prob"])
def test_gradcheck(backend, op):
    require_backend(backend, op, MODULE)
    gen = generator(43)
    params = randn(2, 3, 4, gen=gen, requires_grad=True)
    if op == "bernoulli_log_prob":
        x = uniform(3, 4, gen=gen, low=0.05, high=0.95, requires_grad=True)
        assert gradcheck(bernoulli_log_prob, (params, x), backend)
    elif op == "categorical_log_prob":
        target = torch.randint(0, 4, (3,), generator=gen).to(DEVICE)
        assert gradcheck(lambda logits: categorical_log_prob(logits, target), (params,), backend)
    else:
        fn = normal_log_prob if op == "normal_log_prob" else laplace_log_prob
        log_scale = randn(4, gen=gen, scale=0.3, requires_grad=True)
        x = randn(3, 4, gen=gen, requires_grad=True)
        assert gradcheck(lambda a, b, c: fn(a, b, c, 0.01), (params, log_scale, x), backend)


@pytest.mark.parametrize("backend,dtype", cases(
    [torch.float32, torch.float16, torch.bfloat16],
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]),
    indirect=["backend"])
@pytest.mark.parametrize("op", ["bernoulli_log_prob", "categorical_log_prob", "normal_log_prob",
                                "laplace_log_prob"])
def test_low_precision_inputs(backend, dtype, op):
    require_backend(backend, op, MODULE)
    gen = generator(44)
    K, B, event = 2, 3, (17,)
    params = randn(K, B, *event, *((5,) if op == "categorical_log_prob" else ()), gen=gen,
                   dtype=dtype, requires_grad=True)
    wide = params.detach().to(F64).requires_grad_(True)
    if op == "bernoulli_log_prob":
        x = soft_targets(B, event, gen).to(dtype)
        out = bernoulli_log_prob(params, x)
        x64 = x.to(F64)
        expected = sum_event(x64 * F.logsigmoid(wide) + (1 - x64) * F.logsigmoid(-wide))
    elif op == "categorical_log_prob":
        target = torch.randint(0, 5, (B, *event), generator=gen).to(DEVICE)
        out = categorical_log_prob(params, target)
        expected = sum_event(Categorical(logits=wide).log_prob(target.expand(K, B, *event)))
    else:
        fn, dist = LOCATION_SCALE[op.split("_")[0]]
        log_scale = randn(*event, gen=gen, dtype=dtype, scale=0.3)
        x = randn(B, *event, gen=gen, dtype=dtype)
        out = fn(params, log_scale, x, 1e-3)
        expected = sum_event(dist(wide, 1e-3 + torch.exp(log_scale.to(F64))).log_prob(x.to(F64)))
    assert out.dtype == torch.float32 and out.shape == (K, B)
    close(out, expected, dtype, scale=10.0)
    g = cotangent_like(out, gen)
    (got,) = torch.autograd.grad(out, params, g)
    (want,) = torch.autograd.grad(expected, wide, g.to(F64))
    assert got.dtype == dtype
    close(got, want, dtype, scale=4.0)
