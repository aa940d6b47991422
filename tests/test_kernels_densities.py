"""The Triton latent-density kernels (kernels/densities.py) through mmfast.ops.gaussian_log_prob and
mixture_log_prob on the triton backend (the interpreter without a GPU).

Expectations come from the maths, in float64, never from the code under test: the Gaussian as
``torch.distributions.Normal(mu, exp(logvar / 2)).log_prob(z)`` summed over d, the mixture as an
explicit loop over its components (log-softmax weights plus each Gaussian) closed by a
max-shifted log-sum-exp; gradients come from autograd through those formulas under random
upstream gradients. Broadcast operands are passed unexpanded (the kernel reduces their gradients)
and as stride-0 expanded views (read by strides). Small tile budgets force the chunked paths: d in
several chunks, several row blocks whose partial gradients of a shared operand are summed
afterwards, the mixture's d split across programs.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from _kernel_helpers import (F64, TOL, gen, mixture_log_density, randn,  # noqa: F401
                             triton_backend, uniform)  # (triton_backend: autouse fixture)
from conftest import DEVICE
from mmfast.kernels import densities as kernel
from mmfast.ops import gaussian_log_prob, mixture_log_prob


@pytest.fixture
def small_tiles(monkeypatch):
    """16-element tiles: d of 17 or more spans several chunks, and every (p, q) row is its own
    block, so the gradient of a broadcast operand is a sum of many partials."""
    monkeypatch.setattr(kernel, "element_budget", lambda: 16)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The GPU's tile configuration (register-sized tiles, rows spread over many programs),
    run by the interpreter on tiny tensors."""
    monkeypatch.setattr(kernel, "triton_interpreting", lambda: False)
    monkeypatch.setattr(kernel, "element_budget", lambda: 4096)


def gaussian_density(z, mu, logvar):
    """Σ_j log N(z_j; mu_j, exp(logvar_j)) with torch.distributions: each z[k] broadcast
    against mu (size-1 axes after K when mu has more batch axes than z[k])."""
    z = z.reshape(z.shape[0], *(1,) * (mu.dim() - z.dim() + 1), *z.shape[1:])
    return Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)


def mixture_density(z, logits, mu, logvar):
    """log Σ_c softmax(logits)_c N(z; mu_c, exp(logvar_c)), one component at a time."""
    return mixture_log_density(z, logits, mu, logvar, gaussian_density)


def wide(leaves):
    """float64 copies (the expectation's own leaves) of the kernel's inputs."""
    return [t.detach().to(F64).requires_grad_(True) for t in leaves]


def check(out, expected, leaves, ref_leaves, seed, dtype=F64, tol_scale=1.0, wide_range=False):
    """Values (float32 out, float64 for float64 inputs, contiguous), then the gradients of
    ``Σ g·out`` for a random g with respect to ``leaves`` against those of the expectation with
    respect to its own float64 ``ref_leaves``. ``wide_range``: terms of very different sizes
    (logvar ±30) cancel in sums, so the absolute tolerance is relative to the largest value."""
    rtol, atol = TOL[dtype]

    def close(a, b, what):
        bound = atol * tol_scale
        if wide_range:
            bound = max(bound, rtol * b.abs().max().item())
        torch.testing.assert_close(a.to(F64), b, rtol=rtol, atol=bound,
                                   msg=lambda m: f"{what}: {m}")
    assert out.shape == expected.shape
    assert out.dtype == (F64 if dtype == F64 else torch.float32) and out.is_contiguous()
    close(out, expected, "values")
    g = torch.randn(out.shape, generator=gen(seed), dtype=F64).to(DEVICE) * 1.3 + 0.2
    got = torch.autograd.grad((out.to(F64) * g).sum(), leaves)
    want = torch.autograd.grad((expected * g).sum(), ref_leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == leaves[i].dtype, i
        close(a, b, f"gradient {i}")


# ---------------------------------------------------------------------------- gaussian_log_prob

# (z shape, mu/logvar shape): K in {1, 5, 64}, odd d, [B] and [B, S] batches, parameters per row
# (summed over k), shared over S (stride 0 over S when expanded), a sample scored under every
# subset's q (z summed over S), parameters shared by all rows, and a single sample set scored
# under every row's q.
GAUSSIAN_SHAPES = [
    ((1, 7, 17), (7, 17)),
    ((5, 3, 4, 1), (3, 4, 1)),
    ((64, 6, 9), (6, 9)),
    ((5, 3, 4, 17), (3, 1, 17)),
    ((5, 3, 1, 17), (3, 4, 17)),
    ((5, 3, 4, 17), (17,)),
    ((5, 3, 4, 17), (4, 17)),
    ((5, 17), (6, 17)),
    ((4, 3, 1, 5), (1, 4, 5)),               # z along B only, parameters along S only
    ((3, 2, 3, 4, 5), (2, 1, 4, 5)),         # a rank-3 batch of three broadcast groups
]


def gaussian_case(z_shape, mu_shape, seed, dtype=F64, lv_range=None):
    z = randn(*z_shape, seed=seed, scale=1.5, dtype=dtype)
    mu = randn(*mu_shape, seed=seed + 1, dtype=dtype)
    if lv_range is None:
        logvar = randn(*mu_shape, seed=seed + 2, scale=0.7, dtype=dtype)
    else:
        logvar = uniform(*mu_shape, seed=seed + 2, low=lv_range[0], high=lv_range[1], dtype=dtype)
    return [z, mu, logvar]


def run_gaussian(leaves, seed, dtype=F64, tol_scale=1.0):
    out = gaussian_log_prob(*leaves)
    ref = wide(leaves)
    check(out, gaussian_density(*ref), leaves, ref, seed, dtype, tol_scale)
    return out


@pytest.mark.parametrize("z_shape,mu_shape", GAUSSIAN_SHAPES)
def test_gaussian_matches_the_density(z_shape, mu_shape):
    leaves = gaussian_case(z_shape, mu_shape, seed=len(z_shape) * 10 + z_shape[0])
    before = [t.detach().clone() for t in leaves]
    run_gaussian(leaves, seed=5)
    for old, new in zip(before, leaves):
        assert torch.equal(old, new.detach()), "input was mutated"


@pytest.mark.parametrize("z_shape,mu_shape", [((5, 3, 4, 17), (3, 1, 17)),
                                              ((5, 3, 1, 33), (3, 4, 33)),
                                              ((5, 3, 4, 17), (17,)), ((64, 2, 19), (2, 19))])
def test_gaussian_chunked_tiles(z_shape, mu_shape, small_tiles):
    run_gaussian(gaussian_case(z_shape, mu_shape, seed=11), seed=12)


@pytest.mark.parametrize("z_shape,mu_shape", [((5, 7, 5, 17), (7, 1, 17)),
                                              ((3, 7, 1, 9), (7, 5, 9))])
def test_gaussian_gpu_tiles(z_shape, mu_shape, gpu_tiles):
    run_gaussian(gaussian_case(z_shape, mu_shape, seed=13), seed=14)


def test_gaussian_stride_zero_views():
    """Operands expanded by the caller (stride 0 over S and over K) and a transposed z are read
    by strides; their gradients reach the unexpanded leaves through autograd of the views."""
    K, B, S, d = 5, 3, 4, 7
    mu_row = randn(B, 1, d, seed=20)
    lv_row = randn(B, 1, d, seed=21, scale=0.5)
    z_once = randn(1, B, S, d, seed=22)
    z_t = randn(K, B, d, S, seed=23)
    for z, leaves in ((z_once.expand(K, B, S, d), [z_once, mu_row, lv_row]),
                      (z_t.transpose(-1, -2), [z_t, mu_row, lv_row])):
        mu, lv = mu_row.expand(B, S, d), lv_row.expand(B, S, d)
        assert mu.stride(1) == 0
        out = gaussian_log_prob(z, mu, lv)
        ref = wide(leaves)
        z_ref = ref[0].expand(K, B, S, d) if z.stride(0) == 0 else ref[0].transpose(-1, -2)
        expected = gaussian_density(z_ref, ref[1].expand(B, S, d), ref[2].expand(B, S, d))
        check(out, expected, leaves, ref, seed=24)


def test_gaussian_sum_gives_a_stride_zero_upstream_gradient():
    leaves = gaussian_case((4, 3, 5, 6), (3, 1, 6), seed=25)
    grads = torch.autograd.grad(gaussian_log_prob(*leaves).sum(), leaves)
    ref = wide(leaves)
    for a, b in zip(grads, torch.autograd.grad(gaussian_density(*ref).sum(), ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gaussian_extreme_logvar(dtype):
    """logvar at ±30: precisions of e^30, variances of e^30, neither overflows."""
    z_shape, mu_shape = (5, 3, 4, 17), (3, 1, 17)
    leaves = gaussian_case(z_shape, mu_shape, seed=30, dtype=dtype, lv_range=(-30.0, 30.0))
    with torch.no_grad():
        leaves[2].view(-1)[:2] = torch.tensor([-30.0, 30.0], dtype=dtype)
    out = gaussian_log_prob(*leaves)
    assert torch.isfinite(out).all()
    ref = wide(leaves)
    expected = gaussian_density(*ref)
    check(out, expected, leaves, ref, seed=31, dtype=dtype, wide_range=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gaussian_low_precision(dtype):
    leaves = gaussian_case((5, 3, 4, 17), (3, 1, 17), seed=32, dtype=dtype)
    run_gaussian(leaves, seed=33, dtype=dtype, tol_scale=10.0 if dtype == torch.float16 else 1.0)


def test_gaussian_gradcheck():
    gen_leaves = [gaussian_case((2, 3, 4), (3, 4), seed=34),
                  gaussian_case((2, 3, 1, 3), (3, 2, 3), seed=35),
                  gaussian_case((2, 2, 3), (3,), seed=36)]
    for leaves in gen_leaves:
        assert torch.autograd.gradcheck(gaussian_log_prob, leaves)


def test_gaussian_repeats_are_bitwise_identical(small_tiles):
    leaves = gaussian_case((5, 3, 4, 17), (3, 1, 17), seed=37)

    def once():
        out = gaussian_log_prob(*leaves)
        return [out, *torch.autograd.grad(out.sum(), leaves)]
    first = once()
    for a, b in zip(first, once()):
        assert torch.equal(a, b)


def test_gaussian_backward_without_cotangent_is_zero():
    z, mu, lv = (t.detach() for t in gaussian_case((3, 2, 4, 5), (2, 1, 5), seed=38))
    grads = kernel.gaussian_log_prob_backward(None, z, mu, lv)
    for g, t in zip(grads, (z, mu, lv)):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()


# ----------------------------------------------------------------------------- mixture_log_prob

def mixture_case(z_shape, C, seed, dtype=F64, lv_range=None):
    d = z_shape[-1]
    z = randn(*z_shape, seed=seed, scale=1.5, dtype=dtype)
    logits = randn(C, seed=seed + 1, scale=2.0, dtype=dtype)
    mu = randn(C, d, seed=seed + 2, dtype=dtype)
    if lv_range is None:
        logvar = randn(C, d, seed=seed + 3, scale=0.5, dtype=dtype)
    else:
        logvar = uniform(C, d, seed=seed + 3, low=lv_range[0], high=lv_range[1], dtype=dtype)
    return [z, logits, mu, logvar]


def run_mixture(leaves, seed, dtype=F64, tol_scale=1.0):
    out = mixture_log_prob(*leaves)
    ref = wide(leaves)
    check(out, mixture_density(*ref), leaves, ref, seed, dtype, tol_scale)
    return out


@pytest.mark.parametrize("z_shape,C", [((1, 7, 17), 3), ((5, 3, 4, 9), 1), ((64, 3, 5), 3),
                                       ((5, 3, 4, 7), 64), ((2, 3, 33), 64), ((3, 2, 3, 2, 5), 3)])
def test_mixture_matches_the_density(z_shape, C):
    leaves = mixture_case(z_shape, C, seed=40 + C + z_shape[0])
    before = [t.detach().clone() for t in leaves]
    run_mixture(leaves, seed=41)
    for old, new in zip(before, leaves):
        assert torch.equal(old, new.detach()), "input was mutated"


@pytest.mark.parametrize("z_shape,C", [((3, 2, 17), 3), ((2, 3, 2, 19), 1), ((2, 2, 5), 64)])
def test_mixture_chunked_tiles(z_shape, C, small_tiles):
    run_mixture(mixture_case(z_shape, C, seed=42), seed=43)


@pytest.mark.parametrize("z_shape,C", [((5, 7, 17), 3), ((2, 3, 4, 9), 64)])
def test_mixture_gpu_tiles(z_shape, C, gpu_tiles):
    run_mixture(mixture_case(z_shape, C, seed=44), seed=45)


def test_mixture_strided_samples():
    """z expanded over S (stride 0) and z transposed: read by strides, gradients to the leaves."""
    K, B, S, d, C = 4, 3, 5, 6, 3
    z_once, z_t = randn(K, B, 1, d, seed=46), randn(K, d, B, seed=47)
    prior = mixture_case((1, d), C, seed=48)[1:]
    for z, leaf, view in ((z_once.expand(K, B, S, d), z_once, lambda t: t.expand(K, B, S, d)),
                          (z_t.transpose(1, 2), z_t, lambda t: t.transpose(1, 2))):
        out = mixture_log_prob(z, *prior)
        ref = wide([leaf, *prior])
        check(out, mixture_density(view(ref[0]), *ref[1:]), [leaf, *prior], ref, seed=49)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixture_extreme_logvar(dtype):
    """64 components with logvar in [−30, 30]: component log-densities from about −1e13 to a few
    units, combined by a max-shifted log-sum-exp."""
    leaves = mixture_case((3, 4, 17), 64, seed=50, dtype=dtype, lv_range=(-30.0, 30.0))
    with torch.no_grad():
        leaves[3][0] = -30.0
        leaves[3][1] = 30.0
    out = mixture_log_prob(*leaves)
    assert torch.isfinite(out).all()
    ref = wide(leaves)
    check(out, mixture_density(*ref), leaves, ref, seed=51, dtype=dtype, wide_range=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixture_low_precision(dtype):
    leaves = mixture_case((5, 3, 17), 3, seed=52, dtype=dtype)
    run_mixture(leaves, seed=53, dtype=dtype, tol_scale=10.0 if dtype == torch.float16 else 1.0)


def test_mixture_gradcheck():
    for leaves in (mixture_case((2, 3, 4), 3, seed=54), mixture_case((2, 2, 2, 3), 1, seed=55)):
        assert torch.autograd.gradcheck(mixture_log_prob, leaves)


def test_mixture_repeats_are_bitwise_identical(small_tiles):
    leaves = mixture_case((3, 2, 9), 3, seed=56)

    def once():
        out = mixture_log_prob(*leaves)
        return [out, *torch.autograd.grad(out.sum(), leaves)]
    first = once()
    for a, b in zip(first, once()):
        assert torch.equal(a, b)


def test_mixture_backward_without_cotangent_is_zero():
    leaves = [t.detach() for t in mixture_case((3, 2, 5), 4, seed=57)]
    for g, t in zip(kernel.mixture_log_prob_backward(None, *leaves), leaves):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()


@pytest.mark.parametrize("z_shape", [(0, 3, 5), (3, 0, 5), (3, 4, 0)])
def test_empty_axes(z_shape):
    """No samples, no rows or no latent dimensions: the densities of an empty sum over d are
    log 1 = 0 (a Gaussian) and logsumexp of the log-weights = 0 (a mixture); gradients are 0."""
    K, B, d = z_shape
    for fn, leaves in ((gaussian_log_prob, gaussian_case(z_shape, (B, d), seed=58)),
                       (mixture_log_prob, mixture_case(z_shape, 3, seed=59))):
        out = fn(*leaves)
        assert out.shape == (K, B)
        torch.testing.assert_close(out, torch.zeros(K, B, dtype=F64, device=DEVICE), rtol=0,
                                   atol=1e-12)
        for g, t in zip(torch.autograd.grad(out.sum(), leaves, allow_unused=True), leaves):
            assert g is None or (g.shape == t.shape and not g.any())


# ----------------------------------------------------------------------------------------- GPU

@pytest.mark.cuda
def test_cuda_bfloat16_matches_float64():
    leaves = gaussian_case((8, 64, 3, 20), (64, 1, 20), seed=60, dtype=torch.bfloat16)
    run_gaussian(leaves, seed=61, dtype=torch.bfloat16, tol_scale=10.0)
    leaves = mixture_case((8, 64, 20), 10, seed=62, dtype=torch.bfloat16)
    run_mixture(leaves, seed=63, dtype=torch.bfloat16, tol_scale=10.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["gaussian", "mixture", "gaussian_shared"])
def test_cuda_deterministic_over_repeats(dtype, op):
    if op == "gaussian":
        fn = gaussian_log_prob
        leaves = gaussian_case((64, 4096, 64), (4096, 64), seed=64, dtype=dtype)
    elif op == "gaussian_shared":
        fn, leaves = gaussian_log_prob, gaussian_case((64, 4096, 64), (64,), seed=65, dtype=dtype)
    else:
        fn, leaves = mixture_log_prob, mixture_case((16, 4096, 64), 64, seed=66, dtype=dtype)

    def once():
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out.sum(), leaves)]
    first = once()
    for _ in range(20):
        for a, b in zip(first, once()):
            assert torch.equal(a, b)
