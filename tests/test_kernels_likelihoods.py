"""The Triton likelihood kernels (kernels/likelihoods.py), run through the public ops on the
triton backend (the interpreter without a GPU).

Expectations come from the maths, never from the code under test: each density is written out
element by element in float64 (Bernoulli through log σ, the categorical through an explicit
log-softmax, normal and Laplace through their textbook densities), summed over the event, and
gradients come from autograd through those formulas. Small tile budgets force every chunked
path (several event chunks per row, an online log-sum-exp over class chunks, several position
blocks) on tiny tensors.
"""
from __future__ import annotations

import math

import pytest
import torch

from _kernel_helpers import F64, TOL, gen, triton_backend  # noqa: F401 (autouse fixture)
from conftest import DEVICE
from mmfast.kernels import likelihoods as kernel
from mmfast.ops import bernoulli_log_prob, categorical_log_prob, laplace_log_prob, normal_log_prob


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 elements: an event of more than 64 elements spans several chunks, more than
    64 classes several class chunks (online log-sum-exp), and positions several blocks."""
    monkeypatch.setattr(kernel, "element_budget", lambda: 64)


def randn(*shape, seed, scale=1.0, dtype=F64):
    return (torch.randn(shape, generator=gen(seed), dtype=F64) * scale).to(DEVICE, dtype)


def uniform(*shape, seed, low, high, dtype=F64):
    t = torch.rand(shape, generator=gen(seed), dtype=F64) * (high - low) + low
    return t.to(DEVICE, dtype)


def event_sum(t):
    """``[K, B, *event] -> [K, B]``."""
    return t.reshape(*t.shape[:2], -1).sum(-1)


# Element-wise log-densities in float64, written from their definitions.
def bernoulli_elements(logits, x):
    log_p = -torch.log1p(torch.exp(-logits.abs())) + torch.clamp(logits, max=0)     # log σ(l)
    log_not_p = log_p - logits                                                       # log σ(−l)
    return x * log_p + (1 - x) * log_not_p


def normal_elements(loc, log_scale, x, min_scale):
    scale = min_scale + torch.exp(log_scale)
    return -((x - loc) ** 2) / (2 * scale ** 2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)


def laplace_elements(loc, log_scale, x, min_scale):
    scale = min_scale + torch.exp(log_scale)
    return -(x - loc).abs() / scale - torch.log(2 * scale)


def categorical_elements(logits, target):
    """log softmax at the target, by an explicit max-shifted exponential sum."""
    top = logits.max(-1, keepdim=True).values
    log_norm = top.squeeze(-1) + torch.log(torch.exp(logits - top).sum(-1))
    index = target.expand(logits.shape[:-1]).unsqueeze(-1)
    return logits.gather(-1, index).squeeze(-1) - log_norm


def check(out, expected, leaves, seed, dtype=F64, extra_tol=1.0):
    rtol, atol = TOL[dtype]
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    torch.testing.assert_close(out.to(F64), expected, rtol=rtol, atol=atol * extra_tol)
    g = randn(*out.shape, seed=seed, scale=1.3) + 0.2
    got = torch.autograd.grad((out.to(F64) * g).sum(), leaves)
    want = torch.autograd.grad((expected * g).sum(), leaves)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a.to(F64), b.to(F64), rtol=rtol, atol=atol * extra_tol)


# -------------------------------------------------------------------------------- bernoulli

@pytest.mark.parametrize("K,B,event", [(1, 3, (100,)), (5, 2, (2, 3, 15)), (64, 2, (3,)),
                                     (3, 4, ())])
def test_bernoulli_matches_the_density(K, B, event, small_tiles):
    logits = randn(K, B, *event, seed=1, scale=4.0).requires_grad_(True)
    x = uniform(B, *event, seed=2, low=0.0, high=1.0)
    x.view(-1)[::3] = 1.0
    x.requires_grad_(True)
    out = bernoulli_log_prob(logits, x)
    assert out.shape == (K, B)
    check(out, event_sum(bernoulli_elements(logits, x)), [logits, x], seed=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bernoulli_extreme_logits(dtype):
    values = torch.tensor([-100.0, -60.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 60.0, 100.0], dtype=F64)
    logits = values.repeat(3, 2, 1).to(DEVICE, dtype).requires_grad_(True)        # [3, 2, 9]
    x = torch.tensor([[0.0, 1.0, 0.5] * 3, [1.0, 0.0, 0.25] * 3], dtype=F64).to(DEVICE, dtype)
    out = bernoulli_log_prob(logits, x)
    assert torch.isfinite(out).all()
    wide = logits.detach().to(F64).requires_grad_(True)
    expected = event_sum(bernoulli_elements(wide, x.to(F64)))
    torch.testing.assert_close(out.to(F64), expected, rtol=1e-6 if dtype != F64 else 1e-12,
                               atol=1e-4 if dtype != F64 else 1e-10)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(grad).all()
    # ∂/∂l (x l − softplus l) = x − σ(l), in closed form
    torch.testing.assert_close(grad.to(F64), (x.to(F64) - torch.sigmoid(wide)).detach(),
                               rtol=1e-6, atol=1e-6 if dtype != F64 else 1e-12)


# ------------------------------------------------------------------------------ categorical

@pytest.mark.parametrize("K,B,event,C", [(1, 3, (8,), 71), (5, 2, (), 3), (64, 1, (2,), 5),
                                         (2, 2, (2, 3), 256), (1, 2, (3,), 1)])
def test_categorical_matches_the_log_softmax(K, B, event, C, small_tiles):
    logits = randn(K, B, *event, C, seed=4, scale=3.0).requires_grad_(True)
    target = torch.randint(0, C, (B, *event), generator=gen(5)).to(DEVICE)
    out = categorical_log_prob(logits, target)
    assert out.shape == (K, B)
    check(out, event_sum(categorical_elements(logits, target)), [logits], seed=6)


def test_categorical_default_tiles_many_classes():
    """300 classes in one default-sized tile per position (no chunking)."""
    logits = randn(2, 2, 3, 300, seed=7, scale=5.0).requires_grad_(True)
    target = torch.randint(0, 300, (2, 3), generator=gen(8)).to(DEVICE)
    check(categorical_log_prob(logits, target), event_sum(categorical_elements(logits, target)),
          [logits], seed=9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_categorical_extreme_logits(dtype, small_tiles):
    sign = randn(2, 3, 4, 71, seed=10).sign()
    logits = (sign * 100.0).to(dtype).requires_grad_(True)
    target = torch.randint(0, 71, (3, 4), generator=gen(11)).to(DEVICE)
    out = categorical_log_prob(logits, target)
    wide = logits.detach().to(F64).requires_grad_(True)
    expected = event_sum(categorical_elements(wide, target))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.to(F64), expected, rtol=1e-6, atol=1e-4)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (want,) = torch.autograd.grad(expected.sum(), wide)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.to(F64), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [5, -1])
def test_categorical_out_of_range_target(bad):
    """The op refuses it for CPU tensors (on a GPU it does not check: that would synchronise
    every call); the kernel itself (as on a GPU, or under torch.compile) marks the offending
    rows NaN rather than a wrong value."""
    logits = randn(2, 2, 3, 5, seed=12)
    target = torch.tensor([[0, bad, 1], [2, 3, 4]], device=DEVICE)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match=r"target has class indices.*\[0, 5\)"):
            categorical_log_prob(logits, target)
    out = kernel.categorical_log_prob_forward(logits, target)
    assert torch.isnan(out[:, 0]).all() and torch.isfinite(out[:, 1]).all()


# Categorical tiles forced per case: (BLOCK_R, BLOCK_E, BLOCK_CH, TAIL_CH, BLOCK_CL). A program
# reads BLOCK_R rows b of one sample k and BLOCK_E positions; classes in one chunk of
# (BLOCK_CH + TAIL_CH)·BLOCK_CL lanes when C fits, else BLOCK_CH·BLOCK_CL-class chunks.
CATEGORICAL_TILES = [
    # id, K, B, event, C, tiles, one chunk
    ("rows-partial-block", 3, 5, (4,), 7, (2, 4, 1, 0, 8), True),
    ("odd-E3-two-position-blocks", 2, 3, (3,), 11, (2, 2, 2, 0, 8), True),
    ("odd-E5-rows-past-B", 2, 3, (5,), 13, (4, 4, 4, 0, 4), True),
    ("2d-event-tail", 2, 3, (2, 3), 12, (2, 8, 1, 1, 8), True),
    ("tail-71", 2, 3, (8,), 71, (2, 8, 8, 1, 8), True),
    ("tail-one-class-lane", 2, 3, (4,), 5, (4, 4, 4, 1, 1), True),
    ("chunked-71", 2, 3, (4,), 71, (2, 4, 4, 0, 8), False),
    ("chunked-no-event", 4, 3, (), 9, (2, 1, 2, 0, 4), False),
    ("C1", 3, 2, (3,), 1, (2, 4, 1, 0, 1), True),
    ("C256-one-chunk", 2, 2, (2,), 256, (2, 2, 32, 0, 8), True),
    ("C256-chunked", 2, 2, (2,), 256, (1, 2, 8, 0, 8), False),
]


@pytest.fixture
def categorical_tiles(monkeypatch):
    """``force(tiles)``: the categorical launchers use these blocks (and one warp)."""
    def force(tiles):
        monkeypatch.setattr(kernel, "_categorical_blocks", lambda B, E, C: (*tiles, 1))
    return force


def class_targets(B, event, C, seed):
    """Random class indices, with the first positions pinned to both ends of the classes and
    to the first and last class of the power-of-two part (a tail tile starts after it)."""
    target = torch.randint(0, C, (B, *event), generator=gen(seed)).reshape(B, -1)
    edges = torch.tensor([C - 1, 0, C // 2, max(C - 8, 0)])[: target.shape[1]]
    target[0, : edges.numel()] = edges
    return target.reshape(B, *event).to(DEVICE)


@pytest.mark.parametrize("K,B,event,C,tiles,one_chunk",
                         [case[1:] for case in CATEGORICAL_TILES],
                         ids=[case[0] for case in CATEGORICAL_TILES])
def test_categorical_tiles(K, B, event, C, tiles, one_chunk, categorical_tiles):
    categorical_tiles(tiles)
    E = math.prod(event)
    launch = kernel._categorical_launch(B, E, C, (E * C, C, 1), (E, 1))
    assert launch["ONE_CHUNK"] == one_chunk  # the case takes the path it is named after
    logits = randn(K, B, *event, C, seed=80, scale=3.0).requires_grad_(True)
    target = class_targets(B, event, C, seed=81)
    check(categorical_log_prob(logits, target), event_sum(categorical_elements(logits, target)),
          [logits], seed=82)


@pytest.mark.parametrize("tiles", [(2, 2, 2, 1, 8), (2, 2, 2, 0, 8)], ids=["tail", "chunked"])
def test_categorical_non_contiguous(tiles, categorical_tiles):
    """Logits read by their strides: classes every other element, and the K and B axes
    swapped in memory; a strided target too."""
    categorical_tiles(tiles)
    K, B, E, C = 3, 5, 3, 19
    spread = randn(K, B, E, 2 * C, seed=83, scale=2.0).requires_grad_(True)
    swapped = randn(B, K, E, C, seed=84, scale=2.0).requires_grad_(True)
    target = torch.randint(0, C, (B, 2 * E), generator=gen(85)).to(DEVICE)[:, ::2]
    for leaf, logits in ((spread, spread[..., ::2]), (swapped, swapped.transpose(0, 1))):
        assert not logits.is_contiguous()
        check(categorical_log_prob(logits, target),
              event_sum(categorical_elements(logits, target)), [leaf], seed=86)


def test_categorical_wide_offsets(monkeypatch, categorical_tiles):
    """The int64 in-tile offsets (taken when a tile's offsets could pass 2^31) compute the same."""
    categorical_tiles((2, 2, 2, 1, 8))
    monkeypatch.setattr(kernel, "_needs_wide_offsets", lambda *strides: True)
    logits = randn(2, 3, 3, 21, seed=87, scale=2.0).requires_grad_(True)
    target = class_targets(3, (3,), 21, seed=88)
    check(categorical_log_prob(logits, target), event_sum(categorical_elements(logits, target)),
          [logits], seed=89)


def test_categorical_wide_offsets_rule():
    """int64 offsets exactly when (block − 1)·stride summed over a tile's axes reaches 2^31."""
    assert not kernel._needs_wide_offsets((4, 8, 128), (1000, 100, 1), (8, 1))
    assert kernel._needs_wide_offsets((4, 8, 128), (2 ** 30, 100, 1), (8, 1))
    assert kernel._needs_wide_offsets((1, 8, 128), (1, 1, 1), (2 ** 40, 2 ** 29))  # target
    assert not kernel._needs_wide_offsets((1, 8, 128), (2 ** 40, 1, 1), (8, 1))  # one row


def test_categorical_default_tiles_row_blocks():
    """The interpreter's own blocks: 40 rows b of 8 x 71 fill one row block and part of a second
    (a power-of-two row block below budget / (E·lanes), not the quotient itself)."""
    logits = randn(2, 40, 8, 71, seed=90, scale=3.0).requires_grad_(True)
    target = class_targets(40, (8,), 71, seed=91)
    check(categorical_log_prob(logits, target), event_sum(categorical_elements(logits, target)),
          [logits], seed=92)


def test_categorical_default_tiles_above_one_chunk():
    """1100 classes: more than one chunk's 1024, so the online log-sum-exp over chunks."""
    logits = randn(1, 2, 2, 1100, seed=93, scale=4.0).requires_grad_(True)
    target = class_targets(2, (2,), 1100, seed=94)
    check(categorical_log_prob(logits, target), event_sum(categorical_elements(logits, target)),
          [logits], seed=95)


@pytest.mark.parametrize("tiles", [(2, 4, 2, 1, 8), (2, 4, 2, 0, 8)], ids=["tail", "chunked"])
def test_categorical_minus_infinity_logits(tiles, categorical_tiles):
    """−inf logits (excluded classes) have probability 0 in the main part, the tail and a later
    chunk; a position whose every logit is −inf makes its row NaN (0/0), no other row."""
    categorical_tiles(tiles)
    K, B, E, C = 2, 3, 4, 21
    logits = randn(K, B, E, C, seed=96, scale=2.0)
    target = class_targets(B, (E,), C, seed=97)
    excluded = torch.rand(K, B, E, C, generator=gen(98)) < 0.3
    excluded.scatter_(-1, target.expand(K, B, E).unsqueeze(-1), False)
    excluded[..., 17:] = True   # the tail (classes 16..20) and the last chunk but class 16
    excluded.scatter_(-1, target.expand(K, B, E).unsqueeze(-1), False)
    logits = logits.masked_fill(excluded, float("-inf")).requires_grad_(True)
    out = categorical_log_prob(logits, target)
    expected = event_sum(categorical_elements(logits, target))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (want,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(grad[excluded], torch.zeros_like(grad[excluded]))

    dead = logits.detach().clone()
    dead[1, 2, 3] = float("-inf")
    out = kernel.categorical_log_prob_forward(dead, target)
    assert torch.isnan(out[1, 2])
    assert torch.isfinite(out[1, :2]).all() and torch.isfinite(out[0]).all()


def test_categorical_out_of_range_target_rows(categorical_tiles):
    """Several rows a program: an out-of-range index makes NaN its own row only (in every k)."""
    categorical_tiles((2, 2, 2, 1, 8))
    logits = randn(3, 5, 3, 21, seed=99)
    target = class_targets(5, (3,), 21, seed=100)
    bad = target.clone()
    bad[3, 2] = 21
    out = kernel.categorical_log_prob_forward(logits, bad)
    expected = event_sum(categorical_elements(logits, target))
    rows = [0, 1, 2, 4]
    assert torch.isnan(out[:, 3]).all()
    torch.testing.assert_close(out[:, rows], expected[:, rows], rtol=1e-10, atol=1e-10)


def test_categorical_empty():
    """No positions: every row sums nothing (0), gradient empty. No samples or no rows: an empty
    output (the event's size is not inferred from an empty tensor). No upstream gradient: 0."""
    for shape in [(2, 3, 0, 5), (0, 3, 4, 5), (2, 0, 4, 5), (0, 3, 0, 5)]:
        logits = randn(*shape, seed=101).requires_grad_(True)
        target = torch.zeros(shape[1:-1], dtype=torch.int64, device=DEVICE)
        out = categorical_log_prob(logits, target)
        assert torch.equal(out, torch.zeros(shape[:2], dtype=F64, device=DEVICE))
        (grad,) = torch.autograd.grad(out.sum(), logits)
        assert grad.shape == logits.shape
    full = randn(2, 3, 4, 5, seed=102)
    (dl,) = kernel.categorical_log_prob_backward(None, full, torch.zeros(3, 4, dtype=torch.int64))
    assert torch.equal(dl, torch.zeros_like(full))

@pytest.mark.parametrize("family", ["bernoulli", "normal", "laplace"])
def test_elementwise_empty(family):
    """No samples or no rows: an empty ``[K, B]`` result and empty gradients (the event's size
    is computed, not inferred from an empty tensor); no event elements: every row is 0."""
    for shape in [(0, 3, 4), (2, 0, 4), (2, 3, 0)]:
        params = randn(*shape, seed=103).requires_grad_(True)
        x = (uniform(*shape[1:], seed=104, low=0.0, high=1.0) if family == "bernoulli"
             else randn(*shape[1:], seed=104))
        if family == "bernoulli":
            out = bernoulli_log_prob(params, x)
            inputs = (params,)
        else:
            log_scale = randn(shape[2], seed=105).requires_grad_(True)
            op = normal_log_prob if family == "normal" else laplace_log_prob
            out = op(params, log_scale, x, 0.0)
            inputs = (params, log_scale)
        assert torch.equal(out, torch.zeros(shape[:2], dtype=F64, device=DEVICE))
        grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
        for t, g in zip(inputs, grads):
            assert g is None or (g.shape == t.shape and torch.count_nonzero(g) == 0)


# ------------------------------------------------------------------------- normal, laplace

FAMILIES = {"normal": (normal_log_prob, normal_elements),
            "laplace": (laplace_log_prob, laplace_elements)}


def log_scale_of(kind, K, B, event, seed, low=-1.0, high=1.0):
    channel = event[:1] + (1,) * (len(event) - 1)  # broadcast within the event
    shape = {"full": (K, B, *event), "event": event, "scalar": (),
             "row": (1, B) + (1,) * len(event), "per_k": (K, 1, *event),
             "channel": channel, "k_channel": (K, 1, *channel)}
    return uniform(*shape[kind], seed=seed, low=low, high=high).requires_grad_(True)


@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("scale_kind", ["full", "event", "scalar", "row", "per_k", "channel",
                                        "k_channel"])
@pytest.mark.parametrize("K,B,event", [(1, 3, (100,)), (5, 2, (2, 3, 5)), (64, 2, (3,))])
def test_location_scale_matches_the_density(family, scale_kind, K, B, event, small_tiles):
    op, elements = FAMILIES[family]
    loc = randn(K, B, *event, seed=13).requires_grad_(True)
    log_scale = log_scale_of(scale_kind, K, B, event, seed=14)
    x = randn(B, *event, seed=15, scale=1.5).requires_grad_(True)
    for min_scale in (0.0, 0.05):
        out = op(loc, log_scale, x, min_scale=min_scale)
        assert out.shape == (K, B)
        expected = event_sum(elements(loc, log_scale.expand(loc.shape), x, min_scale))
        check(out, expected, [loc, log_scale, x], seed=16)


@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("shared", [(1, 1), (5, 1), (1, 4)])
def test_shared_scale_gradient_is_reduced_in_the_kernel(family, shared, small_tiles):
    """A log_scale of shape [Ks, Bs, N] gets an [Ks, Bs, N] gradient from the kernel itself
    (no [K, B, N] tensor to reduce afterwards), equal to the summed per-element gradient."""
    K, B, N = 5, 4, 150  # several b-blocks and event chunks under the 64-element tiles
    loc, x = randn(K, B, N, seed=80), randn(B, N, seed=81)
    log_scale = uniform(*shared, N, seed=82, low=-1.0, high=1.0)
    grad = randn(K, B, seed=83)
    backward = getattr(kernel, f"{family}_log_prob_backward")
    _, ds, _ = backward(grad, loc, log_scale, x, 0.02)
    assert ds.shape == log_scale.shape
    full = log_scale.expand(K, B, N).clone().requires_grad_(True)
    elements = FAMILIES[family][1](loc, full, x, 0.02)
    (want,) = torch.autograd.grad((event_sum(elements) * grad).sum(), [full])
    torch.testing.assert_close(ds, want.sum_to_size(log_scale.shape), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["normal", "laplace"])
def test_location_scale_non_contiguous_inputs(family):
    """loc a transposed view, x a strided slice, log_scale a stride-0 expansion."""
    op, elements = FAMILIES[family]
    base = randn(4, 3, 2, 9, seed=17).requires_grad_(True)
    loc = base.transpose(0, 1)[:, :, :, ::2]                         # [3, 4, 2, 5], strided
    x = randn(4, 4, 10, seed=18)[:, ::2, ::2].requires_grad_(False)  # [4, 2, 5]
    log_scale = uniform(5, seed=19, low=-0.5, high=0.5).requires_grad_(True)
    out = op(loc, log_scale, x, min_scale=0.01)
    expected = event_sum(elements(loc, log_scale.expand(loc.shape), x, 0.01))
    check(out, expected, [base, log_scale], seed=20)


@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("min_scale", [0.0, 1e-3])
def test_location_scale_extreme_scales(family, min_scale):
    op, elements = FAMILIES[family]
    loc = randn(2, 3, 17, seed=21).requires_grad_(True)
    log_scale = uniform(2, 3, 17, seed=22, low=-12.0, high=12.0).requires_grad_(True)
    x = randn(3, 17, seed=23).requires_grad_(True)
    out = op(loc, log_scale, x, min_scale=min_scale)
    expected = event_sum(elements(loc, log_scale, x, min_scale))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-6)
    g = randn(2, 3, seed=24)
    got = torch.autograd.grad((out * g).sum(), [loc, log_scale, x])
    want = torch.autograd.grad((expected * g).sum(), [loc, log_scale, x])
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-6)


def test_laplace_gradient_at_a_tie_is_zero():
    """|x − loc| at x = loc: the subgradient 0 (as torch's abs), not ±1/scale."""
    loc = torch.zeros(1, 2, 3, dtype=F64, device=DEVICE, requires_grad=True)
    x = torch.zeros(2, 3, dtype=F64, device=DEVICE)
    (grad,) = torch.autograd.grad(laplace_log_prob(loc, 0.0, x).sum(), loc)
    assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------- gradcheck, dtypes, repeats

@pytest.mark.parametrize("op", ["bernoulli", "categorical", "normal", "laplace"])
def test_gradcheck(op, small_tiles):
    params = randn(2, 3, 5, seed=25, scale=2.0).requires_grad_(True)
    if op == "bernoulli":
        x = uniform(3, 5, seed=26, low=0.05, high=0.95).requires_grad_(True)
        fn, inputs = bernoulli_log_prob, (params, x)
    elif op == "categorical":
        target = torch.randint(0, 5, (3,), generator=gen(27)).to(DEVICE)
        fn, inputs = (lambda logits: categorical_log_prob(logits, target)), (params,)
    else:
        family = normal_log_prob if op == "normal" else laplace_log_prob
        log_scale = randn(5, seed=28, scale=0.3).requires_grad_(True)
        x = randn(3, 5, seed=29).requires_grad_(True)
        fn, inputs = (lambda a, b, c: family(a, b, c, 0.02)), (params, log_scale, x)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def run_all(dtype, seed):
    """Every op's value and gradients on one set of inputs."""
    K, B, N, C = 3, 4, 37, 11
    logits = randn(K, B, N, seed=seed, scale=2.0, dtype=dtype).requires_grad_(True)
    x01 = uniform(B, N, seed=seed + 1, low=0.0, high=1.0, dtype=dtype).requires_grad_(True)
    cat = randn(K, B, 5, C, seed=seed + 2, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, C, (B, 5), generator=gen(seed + 3)).to(DEVICE)
    loc = randn(K, B, N, seed=seed + 4, dtype=dtype).requires_grad_(True)
    log_scale = uniform(N, seed=seed + 5, low=-1.0, high=1.0, dtype=dtype).requires_grad_(True)
    x = randn(B, N, seed=seed + 6, dtype=dtype).requires_grad_(True)
    outs = [bernoulli_log_prob(logits, x01), categorical_log_prob(cat, target),
            normal_log_prob(loc, log_scale, x, 0.01), laplace_log_prob(loc, log_scale, x, 0.01)]
    leaves = [logits, x01, cat, loc, log_scale, x]
    grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves)
    return outs, grads, leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_matches_float64(dtype):
    outs, grads, leaves = run_all(dtype, seed=30)
    wide = [t.detach().to(F64).requires_grad_(True) for t in leaves]
    logits, x01, cat, loc, log_scale, x = wide
    target = torch.randint(0, 11, (4, 5), generator=gen(33)).to(DEVICE)
    expected = [event_sum(bernoulli_elements(logits, x01)),
                event_sum(categorical_elements(cat, target)),
                event_sum(normal_elements(loc, log_scale, x, 0.01)),
                event_sum(laplace_elements(loc, log_scale, x, 0.01))]
    want = torch.autograd.grad(sum(e.sum() for e in expected), wide)
    rtol, atol = TOL[dtype]
    for o, e in zip(outs, expected):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.to(F64), e, rtol=rtol, atol=atol * 10)
    for g, w, leaf in zip(grads, want, leaves):
        assert g.dtype == dtype and g.shape == leaf.shape
        torch.testing.assert_close(g.to(F64), w, rtol=rtol, atol=atol * 10)


def test_repeats_are_bitwise_identical():
    first = run_all(F64, seed=40)
    second = run_all(F64, seed=40)
    for a, b in zip(first[0] + list(first[1]), second[0] + list(second[1])):
        assert torch.equal(a, b)


def test_inputs_are_not_mutated():
    loc = randn(2, 3, 7, seed=41).requires_grad_(True)
    log_scale = randn(7, seed=42).requires_grad_(True)
    x = randn(3, 7, seed=43).requires_grad_(True)
    before = [t.detach().clone() for t in (loc, log_scale, x)]
    torch.autograd.grad(normal_log_prob(loc, log_scale, x, 0.1).sum(), [loc, log_scale, x])
    for old, new in zip(before, (loc, log_scale, x)):
        assert torch.equal(old, new.detach())


def test_gpu_tile_configuration(monkeypatch):
    """The GPU block heuristics (register-sized tiles, a backward split into many programs),
    run in the interpreter on small tensors: values and gradients still match."""
    import mmfast.kernels._common as common
    monkeypatch.setattr(common, "triton_interpreting", lambda: False)
    monkeypatch.setattr(kernel, "triton_interpreting", lambda: False)
    loc = randn(3, 2, 600, seed=70).requires_grad_(True)
    log_scale = uniform(600, seed=71, low=-1.0, high=1.0).requires_grad_(True)
    x = randn(2, 600, seed=72).requires_grad_(True)
    check(laplace_log_prob(loc, log_scale, x, 0.01),
          event_sum(laplace_elements(loc, log_scale.expand(loc.shape), x, 0.01)),
          [loc, log_scale, x], seed=73)
    logits = randn(2, 2, 3, 71, seed=74).requires_grad_(True)
    target = torch.randint(0, 71, (2, 3), generator=gen(75)).to(DEVICE)
    check(categorical_log_prob(logits, target), event_sum(categorical_elements(logits, target)),
          [logits], seed=76)


# --------------------------------------------------------------------------------- GPU only

@pytest.mark.cuda
def test_cuda_bfloat16_matches_float64():
    outs, grads, leaves = run_all(torch.bfloat16, seed=50)
    ref_outs, ref_grads, _ = run_all(F64, seed=50)
    for o, r in zip(outs, ref_outs):
        torch.testing.assert_close(o.to(F64), r, rtol=2e-2, atol=2.0)     # sums of ~150 terms
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.to(F64), r, rtol=5e-2, atol=1e-1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_over_repeats(dtype):
    K, B, N = 16, 512, 784
    logits = randn(K, B, N, seed=60, dtype=dtype).requires_grad_(True)
    x = uniform(B, N, seed=61, low=0.0, high=1.0, dtype=dtype).requires_grad_(True)
    loc = randn(K, B, 3, 32, 32, seed=62, dtype=dtype).requires_grad_(True)
    y = randn(B, 3, 32, 32, seed=63, dtype=dtype).requires_grad_(True)
    log_scale = torch.zeros((), dtype=dtype, device=DEVICE).requires_grad_(True)

    def once():
        outs = [bernoulli_log_prob(logits, x), laplace_log_prob(loc, log_scale, y, 1e-3)]
        return outs + list(torch.autograd.grad(sum(o.sum() for o in outs),
                                               [logits, x, loc, log_scale, y]))
    first = once()
    for _ in range(20):
        for a, b in zip(first, once()):
            assert torch.equal(a, b)
