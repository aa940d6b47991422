"""The Triton subset_sum_pool kernels (kernels/subset_pool.py), run through the public op on the
triton backend (the interpreter without a GPU), against a float64 brute force written from the
definition ``out[b, s] = Σ_{m ∈ S_bs} x[b, m]`` and ``grad_x[b, m] = Σ_s [m ∈ S_bs] g[b, s]``.

Kernel-specific cases: tiling over D and over subsets, M = 64, big subset banks (several
chunks in the backward), every input dtype, stride-0 and non-contiguous inputs, NaN in unused
modalities, gradcheck, and bitwise-deterministic backward passes.
"""
from __future__ import annotations


import pytest
import torch

import mmfast
from conftest import DEVICE
from _seeded import all_subsets_bank, randn, random_mask
from mmfast.ops import subset_sum_pool

F64 = torch.float64
# (rtol, atol) of a kernel output against the float64 brute force on the same (rounded) inputs:
# accumulation is float32, so the error is the final rounding to the output dtype.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
       torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


def as_bank(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dim() == 3 else mask.unsqueeze(1)


def brute_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explicit loops in float64; a modality outside the subset is never touched."""
    B, M, D = x.shape
    bank = as_bank(mask).cpu()
    x = x.detach().cpu().to(F64)
    out = torch.zeros(B, bank.shape[1], D, dtype=F64)
    for b in range(B):
        for s in range(bank.shape[1]):
            for m in range(M):
                if bank[b, s, m]:
                    out[b, s] += x[b, m]
    return out if mask.dim() == 3 else out[:, 0]


def brute_pool_grad(g: torch.Tensor, mask: torch.Tensor, M: int) -> torch.Tensor:
    """``grad_x[b, m] = Σ_s [m ∈ S_bs] g[b, s]`` by loops in float64."""
    bank = as_bank(mask).cpu()
    g = as_bank(g.detach()).cpu().to(F64)
    B, S, D = g.shape
    out = torch.zeros(B, M, D, dtype=F64)
    for b in range(B):
        for s in range(S):
            for m in range(M):
                if bank[b, s, m]:
                    out[b, m] += g[b, s]
    return out


def run_triton(x: torch.Tensor, mask: torch.Tensor, g: torch.Tensor):
    """(out, grad_x) of the public op on the triton backend for upstream gradient g."""
    x = x.detach().clone().requires_grad_(True)
    with mmfast.use_backend("triton"):
        out = subset_sum_pool(x, mask)
        (grad_x,) = torch.autograd.grad(out, x, g)
    return out, grad_x


def check(x: torch.Tensor, mask: torch.Tensor, seed: int) -> None:
    M = x.shape[1]
    expected = brute_pool(x, mask)
    g = randn(*expected.shape, seed=seed + 1, dtype=x.dtype) * 1.5 + 0.25
    out, grad_x = run_triton(x, mask, g)
    assert out.dtype == x.dtype and grad_x.dtype == x.dtype
    assert out.is_contiguous() and grad_x.is_contiguous()
    assert out.shape == expected.shape and grad_x.shape == x.shape
    rtol, atol = TOL[x.dtype]
    scale = max(1.0, M ** 0.5)
    torch.testing.assert_close(out.cpu().to(F64), expected, rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(grad_x.cpu().to(F64), brute_pool_grad(g, mask, M),
                               rtol=rtol, atol=atol * scale * max(1.0, as_bank(g).shape[1] ** 0.5))


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,M,D", [(3, 1, 1), (5, 3, 17), (7, 5, 100)])
def test_row_masks(B, M, D, dtype):
    mask = random_mask(B, M, seed=B + M)
    mask[0] = False              # empty subset -> zeros
    mask[1] = True               # full subset
    check(randn(B, M, D, seed=D, dtype=dtype), mask, seed=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D", [(3, 17), (5, 100)])
def test_shared_bank_of_every_subset_is_read_by_strides(M, D, dtype):
    bank = all_subsets_bank(M)                  # empty and full included
    mask = bank.expand(3, *bank.shape)
    assert mask.stride(0) == 0
    check(randn(3, M, D, seed=M * D, dtype=dtype), mask, seed=5)


def test_per_row_bank_with_empty_rows():
    mask = random_mask(5, 6, 4, seed=11)
    mask[0] = False                              # every subset of row 0 empty
    mask[1, 2] = True
    check(randn(5, 4, 33, seed=12), mask, seed=13)


def test_big_bank_spans_several_subset_blocks_and_chunks():
    """255 subsets of 8 modalities, D = 600: the forward and the backward sweep the bank in
    several chunks."""
    bank = all_subsets_bank(8)[1:]
    check(randn(3, 8, 600, seed=21, dtype=torch.float32), bank.expand(3, 255, 8), seed=22)


def test_features_wider_than_one_block():
    """D = 4096 + 17 takes two feature blocks even with the interpreter's widest tile."""
    mask = random_mask(2, 3, seed=31)
    mask[0] = True
    check(randn(2, 3, 4096 + 17, seed=32, dtype=torch.float32), mask, seed=33)


def test_sixty_four_modalities():
    bank = random_mask(5, 64, seed=41)
    bank[0] = False
    bank[1] = True
    check(randn(2, 64, 33, seed=42), bank.expand(2, 5, 64), seed=43)
    check(randn(3, 64, 9, seed=44), random_mask(3, 64, seed=45), seed=46)


def test_non_contiguous_inputs():
    x = randn(17, 4, 3, seed=51).transpose(0, 2)          # [3, 4, 17] with odd strides
    mask = random_mask(4, 3, seed=52).t()                 # [3, 4], transposed
    assert not x.is_contiguous() and not mask.is_contiguous()
    check(x, mask, seed=53)
    g_bank = random_mask(3, 6, 4, seed=54)[:, ::2]        # [3, 3, 4], stride 2 on subsets
    check(x, g_bank, seed=55)


def test_modality_and_feature_major_layouts():
    """x stored modality-major (``[M, B, D]`` permuted, stride B*D on m), the mask
    modality-major, and an upstream gradient stored feature-first (stride B*S on d), handed
    straight to the kernels. The 64-bit offsets these layouts need only matter past 2^31
    elements, too big for the interpreter: this checks the strided path at a small size."""
    from mmfast.kernels import subset_pool as kernel
    B, M, D, S = 3, 5, 19, 6
    x = randn(M, B, D, seed=141).transpose(0, 1)                 # [B, M, D]
    mask = random_mask(M, B, S, seed=142).permute(1, 2, 0)       # [B, S, M]
    g = randn(D, B, S, seed=143).permute(1, 2, 0)                # [B, S, D]
    assert x.stride(1) == B * D and mask.stride(2) == B * S and g.stride(2) == B * S
    torch.testing.assert_close(kernel.launch_pool(x, mask), brute_pool(x, mask),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel.launch_pool_transpose(g, mask, M, F64),
                               brute_pool_grad(g, mask, M), rtol=1e-12, atol=1e-12)

def test_mask_rows_as_vector_loads():
    """The launchers (pool and PoE) read a subset's membership row as one vector load only when
    that row is a contiguous block of M bytes (M a power of two) aligned to min(M, 16) for
    every row and subset; any other layout takes byte loads. Both give the brute force's
    values."""
    from mmfast.kernels import _masks
    from mmfast.kernels._common import next_power_of_2

    def mask_row(mask):
        as_bytes, _, strides = _masks.mask_layout(mask)
        M = mask.shape[-1]
        return _masks.mask_row(as_bytes, M, next_power_of_2(M), strides)

    B, M, D = 3, 4, 5
    bank = all_subsets_bank(M).expand(B, 2 ** M, M)              # stride-0 bank
    storage = torch.zeros(B * 4 * M + 1, dtype=torch.bool, device=DEVICE)
    shifted = storage[1:].view(B, 4, M)                           # rows start 1 byte off
    shifted.copy_(random_mask(B, 4, M, seed=150))
    wide = random_mask(B, 2, 32, seed=151)                        # M = 32: 16-byte pieces
    assert mask_row(bank) == 4 and mask_row(bank[:, :, :2]) == 2 and mask_row(wide) == 16
    assert mask_row(bank[:, :, 1:3]) == 1 and mask_row(shifted) == 1
    assert mask_row(random_mask(B, 4, 5, seed=152)) == 1          # M not a power of two
    assert mask_row(random_mask(M, B, seed=153).t()) == 1         # stride B on modalities
    for mask in (bank, bank[:, :, 1:3], shifted):
        check(randn(B, mask.shape[-1], D, seed=154), mask, seed=155)
    check(randn(B, 32, D, seed=156), wide, seed=157)


def test_empty_bank_and_zero_width():
    x = randn(3, 4, 5, seed=61)
    out, grad_x = run_triton(x, torch.zeros(3, 0, 4, dtype=torch.bool, device=DEVICE),
                             torch.zeros(3, 0, 5, dtype=F64, device=DEVICE))
    assert out.shape == (3, 0, 5)
    assert torch.equal(grad_x, torch.zeros_like(x))
    check(randn(3, 4, 0, seed=62), random_mask(3, 4, seed=63), seed=64)


def test_unused_modalities_are_never_read():
    """NaN in modalities outside every subset of a row leaves values and gradients finite."""
    x = randn(4, 5, 21, seed=71)
    mask = random_mask(4, 3, 5, seed=72)
    mask[:, :, 4] = False
    mask[2:, :, 1] = False
    x_nan = x.clone()
    x_nan[:, 4] = float("nan")
    x_nan[2:, 1] = float("inf")
    g = randn(4, 3, 21, seed=73)
    out, grad_x = run_triton(x_nan, mask, g)
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    torch.testing.assert_close(out.cpu(), brute_pool(x, mask))
    assert torch.equal(grad_x[:, 4], torch.zeros_like(grad_x[:, 4]))
    row = mask[:, 0]                                    # the same rule for [B, M] masks
    out, grad_x = run_triton(x_nan, row, g[:, 0])
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all()
    torch.testing.assert_close(out.cpu(), brute_pool(x, row))


def test_inputs_not_mutated():
    x = randn(3, 4, 10, seed=81)
    mask = random_mask(3, 2, 4, seed=82)
    x0, mask0 = x.clone(), mask.clone()
    run_triton(x, mask, randn(3, 2, 10, seed=83))
    assert torch.equal(x, x0) and torch.equal(mask, mask0)


def test_gradcheck():
    x = randn(2, 3, 5, seed=91).requires_grad_(True)
    bank = all_subsets_bank(3).expand(2, 8, 3)
    with mmfast.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda t: subset_sum_pool(t, bank), (x,))
        assert torch.autograd.gradcheck(lambda t: subset_sum_pool(t, bank[:, 5]), (x,))


def test_backward_is_bitwise_deterministic():
    x = randn(3, 8, 300, seed=101, dtype=torch.float32)
    bank = all_subsets_bank(8)[1:].expand(3, 255, 8)
    g = randn(3, 255, 300, seed=102, dtype=torch.float32)
    first = run_triton(x, bank, g)[1]
    for _ in range(2):
        assert torch.equal(run_triton(x, bank, g)[1], first)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The kernel module with its GPU tile configuration (block sizes depend on whether the
    interpreter runs): the CPU suite otherwise never runs the tiles the GPU uses."""
    from mmfast.kernels import subset_pool as kernel
    monkeypatch.setattr(kernel, "triton_interpreting", lambda: False)
    return kernel


@pytest.mark.parametrize("shape", ["bank", "row"])
def test_gpu_tile_configuration(gpu_tiles, shape):
    """Forward: D = 1030 over three 512-wide feature blocks, each row's 9 subsets split over
    five programs in chunks of two (the last part holds one), 30 programs. Backward: three
    512-wide feature blocks, subsets reduced in chunks of two, 6 programs. Both read the
    membership as bit sets (ROW_BITS), M = 5 byte by byte."""
    assert gpu_tiles._forward_blocks(9, 5, 1030) == (8, 512, 2, 4)
    assert gpu_tiles._backward_blocks(9, 5, 1030) == (8, 512, 2, 4)
    assert gpu_tiles._row_bits(5, 8)
    B, M, D = 2, 5, 1030
    mask = random_mask(B, 9, M, seed=151)
    mask[0, 0] = False
    mask[1, 8] = True
    mask = mask if shape == "bank" else mask[:, 3]
    x = randn(B, M, D, seed=152, dtype=torch.float32)
    check(x, mask, seed=153)
    bias = randn(D, seed=154, dtype=torch.float32)
    torch.testing.assert_close(gpu_tiles.launch_pool(x, mask, bias).to(F64),
                               brute_pool(x, mask) + bias.to(F64), rtol=1e-5, atol=1e-5)
    unused = mask.clone()
    unused[..., 4] = False
    x_nan = x.clone()
    x_nan[:, 4] = float("nan")
    torch.testing.assert_close(gpu_tiles.launch_pool(x_nan, unused).to(F64),
                               brute_pool(x, unused), rtol=1e-5, atol=1e-5)

# (M, D, S, dtype, mask rows read as 32-bit words, lanes along the chunk's subsets)
ROW_BITS_CASES = [
    (8, 300, 255, torch.float32, True, False),
    (8, 64, 255, torch.float32, True, True),
    (8, 512, 9, torch.bfloat16, True, False),     # 8 features a thread, 2 warps
    (8, 64, 9, torch.float64, True, False),
    (16, 40, 7, torch.float32, True, True),
    (4, 9, 1, torch.float32, True, False),
    (3, 70, 7, torch.float16, False, True),
    (2, 3, 3, torch.float32, False, True),
    (1, 1, 2, torch.float32, False, True),
]


@pytest.mark.parametrize("M,D,S,dtype,words,lanes_on_subsets", ROW_BITS_CASES)
def test_gpu_tiles_read_membership_rows_as_bits(gpu_tiles, M, D, S, dtype, words,
                                                 lanes_on_subsets):
    """The GPU tiles of the ROW_BITS kernels (M <= 16), forward with a bias and backward:
    aligned rows of M = 4, 8, 16 read as 32-bit words, other M byte by byte; few features put
    lanes along the chunk's subsets (X_ROWS, ACC_ROWS = CHUNK_S). NaN rows of modalities no
    subset of the row holds stay out, and a NaN upstream gradient of one subset reaches only
    that subset's modalities."""
    from mmfast.kernels import _masks
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_m, block_d, chunk_s, warps = gpu_tiles._backward_blocks(S, M, D, itemsize)
    assert gpu_tiles._row_bits(M, block_m)
    assert (gpu_tiles.lane_rows(block_d, chunk_s, warps, itemsize) > 1) == lanes_on_subsets
    B = 3
    mask = (all_subsets_bank(M)[1:].flip(0)[:S] if M <= 8 else random_mask(S, M, seed=160)
            ).expand(B, S, M)
    if S == 1:
        mask = mask[:, 0]
    layout = _masks.mask_layout(mask)
    mask_row = _masks.mask_row(layout[0], M, block_m, layout[2])
    assert (mask_row >= 4 and mask_row == block_m) == words
    x = randn(B, M, D, seed=161, dtype=dtype)
    check(x, mask, seed=162)
    rtol, atol = TOL[dtype]
    bias = randn(D, seed=164, dtype=dtype)
    torch.testing.assert_close(gpu_tiles.launch_pool(x, mask, bias).to(F64),
                               brute_pool(x, mask) + bias.to(F64), rtol=rtol, atol=4 * atol)
    unused = mask.clone()
    unused[..., M - 1] = False
    x_nan = x.clone()
    x_nan[:, M - 1] = float("nan")
    torch.testing.assert_close(gpu_tiles.launch_pool(x_nan, unused).to(F64),
                               brute_pool(x, unused), rtol=rtol, atol=4 * atol)
    if M == 1:
        return                   # no modality is left to receive a gradient
    g = randn(*unused.shape[:-1], D, seed=163, dtype=dtype)
    g_nan = g.clone()
    if unused.dim() == 3:                    # row 0's first non-empty subset
        k = int(unused[0].any(-1).nonzero()[0])
        first = unused[0, k]
        g_nan[0, k] = float("nan")
    else:
        first = unused[0]
        g_nan[0] = float("nan")
    grad = gpu_tiles.launch_pool_transpose(g_nan, unused, M, dtype)
    assert first.any() and torch.isnan(grad[0, first]).all()
    assert not torch.isnan(grad[0, ~first]).any() and not torch.isnan(grad[1:]).any()


def test_gpu_tiles_several_chunks_a_program(gpu_tiles, monkeypatch):
    """With fewer programs wanted than chunks (PROGRAMS), each forward program sweeps several
    chunks of its row's subsets; a row's programs split the 255-subset bank between them."""
    monkeypatch.setattr(gpu_tiles, "PROGRAMS", 64)
    B, M, D = 3, 8, 40
    _, block_d, chunk_s, _ = gpu_tiles._forward_blocks(255, M, D)
    chunks = -(-255 // chunk_s)
    splits = max(1, min(chunks, -(-64 // (B * -(-D // block_d)))))
    assert -(-chunks // splits) > 1                     # several chunks a program
    mask = all_subsets_bank(M)[1:].expand(B, 255, M)
    x = randn(B, M, D, seed=171, dtype=torch.float32)
    x_nan = x.clone()
    x_nan[1, 3] = float("nan")
    unused = mask.clone()
    unused[1, :, 3] = False
    torch.testing.assert_close(gpu_tiles.launch_pool(x_nan, unused).to(F64), brute_pool(x, unused),
                               rtol=1e-5, atol=1e-5)


# --- GPU only -------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,M,D,S", [(257, 8, 512, 255), (1000, 3, 4100, None), (33, 64, 96, 40)])
def test_cuda_low_precision_tolerances(B, M, D, S, dtype):
    x = randn(B, M, D, seed=111, dtype=dtype)
    mask = random_mask(B, M, seed=112) if S is None else random_mask(S, M, seed=113).expand(B, S, M)
    g = randn(*mask.shape[:-1], D, seed=114, dtype=dtype)
    out, grad_x = run_triton(x, mask, g)
    # Float64 on the GPU, by matmul against the subset matrix: independent of the kernel.
    weights = as_bank(mask).to(F64)
    expected = torch.einsum("bsm,bmd->bsd", weights, x.to(F64))
    expected_grad = torch.einsum("bsm,bsd->bmd", weights, as_bank(g).to(F64))
    expected = expected if mask.dim() == 3 else expected[:, 0]
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.to(F64), expected, rtol=rtol, atol=atol * M ** 0.5)
    torch.testing.assert_close(grad_x.to(F64), expected_grad, rtol=rtol,
                               atol=atol * (weights.shape[1] * M) ** 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_identical_over_100_repeats(dtype):
    x = randn(512, 8, 512, seed=121, dtype=dtype)
    bank = all_subsets_bank(8)[1:].expand(512, 255, 8)
    g = randn(512, 255, 512, seed=122, dtype=dtype)
    first = run_triton(x, bank, g)[1]
    for _ in range(100):
        assert torch.equal(run_triton(x, bank, g)[1], first)


@pytest.mark.cuda
def test_cuda_every_subset_of_twelve_modalities():
    x = randn(64, 12, 256, seed=131, dtype=torch.float32)
    bank = all_subsets_bank(12)[1:].expand(64, 4095, 12)
    out = run_triton(x, bank, randn(64, 4095, 256, seed=132, dtype=torch.float32))[0]
    expected = torch.einsum("sm,bmd->bsd", bank[0].to(F64), x.to(F64))
    torch.testing.assert_close(out.to(F64), expected, rtol=1e-5, atol=1e-4)
