"""The Triton subset_attention kernels (kernels/subset_attention.py), through the public op on the
triton backend (the interpreter without a GPU), against a float64 brute force written here from
the definition, and against mmfast's float64 reference.

Definition, per row b, subset s, head h and query token i ∈ s (tokens outside s get zero rows):
``out[b, s, i, h] = Σ_{j ∈ s} softmax_j(scale · q_i·k_j) v_j`` over the head's slice, and the
kernel's saved ``lse[b, s, h, i] = log Σ_{j ∈ s} exp(scale · q_i·k_j)`` (0 for i ∉ s).
Gradients are checked against autograd through the brute force, and, for singleton subsets,
against closed forms (dq = dk = 0, dv = Σ_s dout).

Kernel-specific cases: odd M (1 ... 64) and head dims (1 ... 128), banks spanning several
subset chunks, every dtype, stride-0 banks and non-contiguous inputs and gradients, subsets that
exclude a dominant key, NaN in tokens outside every subset, gradcheck, bitwise-deterministic
backward passes, and the SelfAttention aggregator running the kernel through dispatch.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import mmfast
from conftest import DEVICE
from mmfast.ops import subset_attention
from mmfast.ops.reference import subset_attention as reference_attention

F64 = torch.float64
# (rtol, atol) against the float64 brute force on the same (rounded) inputs. Accumulation is
# float32 (float64 for float64); half-precision outputs carry their final rounding, and their
# dots run in TF32.
TOL = {torch.float64: (1e-11, 1e-11), torch.float32: (2e-5, 2e-5),
       torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
GRAD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4),
            torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2)}


def kernel_module():
    from mmfast.kernels import subset_attention as kernel
    return kernel


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, dtype=F64, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=F64) * scale).to(DEVICE, dtype)


def random_mask(*shape, seed: int, p: float = 0.5) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen(seed)) < p).to(DEVICE)


def every_subset(M: int) -> torch.Tensor:
    """bool ``[2^M, M]``, the empty and full sets included (itertools, not mmfast.subsets)."""
    return torch.tensor(list(itertools.product([False, True], repeat=M)),
                        dtype=torch.bool, device=DEVICE).reshape(2 ** M, M)


def edge_bank(M: int, extra: int, seed: int) -> torch.Tensor:
    """``[M + 2 + extra, M]``: the empty set, the full set, every singleton, random subsets."""
    rows = [torch.zeros(M, dtype=torch.bool), torch.ones(M, dtype=torch.bool)]
    rows += list(torch.eye(M, dtype=torch.bool))
    rows += list(torch.rand(extra, M, generator=gen(seed)) < 0.5)
    return torch.stack(rows).to(DEVICE)


def make_mask(kind: str, B: int, M: int, seed: int) -> torch.Tensor:
    """``row``: ``[B, M]`` with an empty row 0 and a full row 1; ``bank``: a stride-0 shared
    bank of edge cases; ``row_bank``: contiguous ``[B, 4, M]``, row 0 entirely empty."""
    if kind == "row":
        mask = random_mask(B, M, seed=seed)
        mask[0] = False
        if B > 1:
            mask[1] = True
        return mask
    if kind == "bank":
        bank = every_subset(M) if M <= 3 else edge_bank(M, 3, seed)
        mask = bank.expand(B, *bank.shape)
        assert B == 1 or mask.stride(0) == 0
        return mask
    if kind == "row_bank":
        mask = random_mask(B, 4, M, seed=seed)
        mask[0] = False
        if B > 1:
            mask[1, 0] = True
        return mask
    raise ValueError(kind)


def as_bank(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dim() == 3 else mask.unsqueeze(1)


def brute_attention(q, k, v, mask, num_heads: int, scale: float):
    """Loops over rows, subsets, query tokens and heads in float64, a softmax over the subset's
    keys written out with exp and a sum. Differentiable in q, k, v.

    Returns ``out`` ``[B, S, M, E]`` and ``lse`` ``[B, S, H, M]`` (0 for queries outside the
    subset), with the subset axis dropped for ``[B, M]`` masks.
    """
    q, k, v = (t.to(F64) for t in (q, k, v))
    B, M, E = q.shape
    dh = E // num_heads
    bank = as_bank(mask).cpu().tolist()
    S = len(bank[0])
    lse = torch.zeros(B, S, num_heads, M, dtype=F64)
    out = []
    for b in range(B):
        per_subset = []
        for s in range(S):
            members = [m for m in range(M) if bank[b][s][m]]
            keys = torch.tensor(members, dtype=torch.long, device=q.device)
            rows = []
            for i in range(M):
                if i not in members:
                    rows.append(q.new_zeros(E))
                    continue
                heads = []
                for h in range(num_heads):
                    cols = slice(h * dh, (h + 1) * dh)
                    scores = (q[b, i, cols] * k[b, keys, cols]).sum(-1) * scale        # [|s|]
                    top = scores.max().detach()
                    weights = torch.exp(scores - top)
                    total = weights.sum()
                    lse[b, s, h, i] = float(top + torch.log(total.detach()))
                    heads.append((weights[:, None] / total * v[b, keys, cols]).sum(0))
                rows.append(torch.cat(heads))
            per_subset.append(torch.stack(rows))
        out.append(torch.stack(per_subset))
    out = torch.stack(out)
    if mask.dim() == 2:
        return out[:, 0], lse[:, 0]
    return out, lse


def run_triton(q, k, v, mask, num_heads, g, scale=None):
    """(out, (dq, dk, dv)) of the public op on the triton backend for upstream gradient g."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with mmfast.use_backend("triton"):
        out = subset_attention(*leaves, mask, num_heads, scale)
        grads = torch.autograd.grad(out, leaves, g)
    return out, grads


def expected_grads(q, k, v, mask, num_heads, scale, g):
    leaves = [t.detach().to(F64).requires_grad_(True) for t in (q, k, v)]
    out, _ = brute_attention(*leaves, mask, num_heads, scale)
    if not out.requires_grad:                  # every subset empty: nothing depends on q, k, v
        return [torch.zeros_like(t) for t in leaves]
    return torch.autograd.grad(out, leaves, g.to(F64), allow_unused=True, materialize_grads=True)


def check(q, k, v, mask, num_heads, seed, scale=None):
    """Values, saved lse and gradients of the kernel against the brute force."""
    dtype = q.dtype
    E = q.shape[2]
    used_scale = 1.0 / math.sqrt(E // num_heads) if scale is None else scale
    expected, expected_lse = brute_attention(q, k, v, mask, num_heads, used_scale)
    g = (randn(*expected.shape, seed=seed) * 1.5 + 0.25).to(dtype)
    out, grads = run_triton(q, k, v, mask, num_heads, g, scale)
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.cpu().to(F64), expected.cpu(), rtol=rtol, atol=atol)

    _, lse = kernel_module().subset_attention_forward(q, k, v, mask, num_heads, used_scale)
    assert lse.dtype == (F64 if dtype == F64 else torch.float32)
    assert lse.shape == (*mask.shape[:-1], num_heads, q.shape[1]) and lse.is_contiguous()
    torch.testing.assert_close(lse.cpu().to(F64), expected_lse, rtol=1e-5 if dtype != F64 else
                               1e-12, atol=1e-5 if dtype != F64 else 1e-12)

    subsets = as_bank(mask).shape[1]
    grtol, gatol = GRAD_TOL[dtype]
    for got, want in zip(grads, expected_grads(q, k, v, mask, num_heads, used_scale, g)):
        assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
        torch.testing.assert_close(got.cpu().to(F64), want.cpu(), rtol=grtol,
                                   atol=gatol * max(1.0, subsets ** 0.5))


# (B, M, E, H, mask kind): odd M and head dims (Dh = 17, 3, 17, 100, 4, 128).
SHAPES = [(3, 1, 17, 1, "row"), (3, 3, 6, 2, "bank"), (2, 5, 34, 2, "row_bank"),
          (2, 7, 100, 1, "bank"), (2, 16, 16, 4, "row_bank"), (2, 17, 256, 2, "row")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,M,E,H,kind", SHAPES)
def test_matches_brute_force(B, M, E, H, kind, dtype):
    seed = B * 1000 + M * 10 + E
    q, k, v = (randn(B, M, E, seed=seed + i, dtype=dtype) for i in range(3))
    check(q, k, v, make_mask(kind, B, M, seed), H, seed=seed + 7)


@pytest.mark.parametrize("M,S,Dh,block_q", [(8, 256, 16, 8), (3, 8, 20, 4), (8, 1, 16, 16),
                                             (2, 4, 16, 4), (12, 40, 16, 16)])
def test_gpu_tiles(monkeypatch, M, S, Dh, block_q):
    """The general (tl.dot) kernel's GPU tile configuration under the interpreter (block sizes,
    and the split of a row's subsets over programs, depend on whether the interpreter runs):
    query blocks narrower than 16 (8 and 4 at M = 8 and 3, with several subsets a chunk), the
    per-sample case where the single-subset chunk pads queries to 16, and the forward's split
    of a row's subsets. Tokens up to SMALL_M go to the small kernel unless SMALL_M is 0."""
    kernel = kernel_module()
    monkeypatch.setattr(kernel, "triton_interpreting", lambda: False)
    monkeypatch.setattr(kernel, "SMALL_M", 0)
    got_q, block_k, block_d, chunk_s, _ = kernel._blocks(S, M, Dh)
    assert got_q == block_q and block_k >= 16 and block_d >= 16 and chunk_s * block_q >= 16
    B, H = 2, 2
    seed = 500 + M * 10 + S
    q, k, v = (randn(B, M, H * Dh, seed=seed + i, dtype=torch.float32) for i in range(3))
    mask = random_mask(B, M, seed=seed + 3) if S == 1 else (
        every_subset(M)[:S].expand(B, S, M) if 2 ** M >= S else random_mask(B, S, M, seed=seed))
    check(q, k, v, mask, H, seed=seed + 4)


def small_module():
    from mmfast.kernels import subset_attention_small as small
    return small


@pytest.mark.parametrize("M,S,Dh,mask_kind", [(8, 255, 64, "bank"), (8, 1, 20, "row"),
                                               (4, 13, 17, "rows"), (3, 7, 64, "bank"),
                                               (5, 9, 6, "rows"), (1, 3, 8, "rows")])
def test_small_kernel_gpu_tiles(monkeypatch, M, S, Dh, mask_kind):
    """The small-M kernels (kernels/subset_attention_small.py) with their GPU tiles under the
    interpreter: 4 subsets a forward chunk and 2 a backward chunk at M = 8 (a bank of 255
    subsets ends in a partial chunk), the forward's split of a row's subsets over programs,
    head slices narrower than a lane's vector (Dh = 6, 17, 20), and the three ways membership is
    read: 32-bit words (M = 8 and 4, aligned rows), bytes (M = 3, 5, 1)."""
    kernel, small = kernel_module(), small_module()
    monkeypatch.setattr(kernel, "triton_interpreting", lambda: False)
    monkeypatch.setattr(small, "triton_interpreting", lambda: False)
    block_m, chunk_s, di, dl, warps = small.small_blocks(S, M, Dh, 4)
    _, back_chunk, _, _, _ = small.small_blocks(S, M, Dh, 4, backward=True)
    assert block_m * chunk_s <= 32 and block_m * back_chunk <= 16 and di * dl >= Dh
    if M == 8 and S > 1:
        assert (chunk_s, back_chunk) == (4, 2)
    B, H = 3, 2
    seed = 700 + M * 10 + S
    q, k, v = (randn(B, M, H * Dh, seed=seed + i, dtype=torch.float32) for i in range(3))
    if mask_kind == "bank":
        bank = every_subset(M)[1:S + 1]
        mask = bank.expand(B, S, M)
    elif mask_kind == "row":
        mask = random_mask(B, M, seed=seed + 3)
    else:
        mask = random_mask(B, S, M, seed=seed + 3)
    check(q, k, v, mask, H, seed=seed + 4)


def test_small_kernel_reads_membership_words_only_when_rows_are_aligned():
    """mask_row decides the small kernel's word reads: M = 8 and 4 rows that are whole aligned
    blocks read words; a bank viewed at a one-byte offset, and M not a power of two, read bytes.
    Each case gives the brute force's values and gradients."""
    from mmfast.kernels._masks import mask_layout, mask_row
    B, M, E, H = 2, 8, 16, 2
    q, k, v = (randn(B, M, E, seed=131 + i) for i in range(3))
    table = torch.zeros(2 * 37 * M + 1, dtype=torch.bool, device=DEVICE)
    table[1:] = random_mask(2 * 37 * M, seed=134)
    aligned = table[:-1].view(2, 37, M)
    shifted = table[1:].view(2, 37, M)                   # data_ptr one byte past alignment
    for mask, words in ((aligned, True), (shifted, False)):
        mask_bytes, _, strides = mask_layout(mask)
        assert (mask_row(mask_bytes, M, M, strides) >= 4) == words
        check(q, k, v, mask, H, seed=135)
    q4, k4, v4 = (t[:, :4] for t in (q, k, v))
    check(q4, k4, v4, random_mask(B, 6, 4, seed=136), H, seed=137)


def test_small_kernel_with_32_tokens_reads_rows_aligned_to_16_bytes_as_bytes(monkeypatch):
    """MMFAST_ATTENTION_SMALL_M may reach 32: a 32-token mask whose rows are 16-byte aligned but
    not 32-byte aligned (mask_row gives 16) must be read byte by byte, not as words counted in
    32-byte rows."""
    from mmfast.kernels._masks import mask_layout, mask_row
    kernel = kernel_module()
    monkeypatch.setattr(kernel, "SMALL_M", 32)
    B, M, E, H = 2, 32, 4, 1
    q, k, v = (randn(B, M, E, seed=181 + i) for i in range(3))
    mask = random_mask(B * 3, 48, seed=184).view(B, 3, 48)[:, :, :M]
    mask_bytes, _, strides = mask_layout(mask)
    assert mask_row(mask_bytes, M, M, strides) == 16
    check(q, k, v, mask, H, seed=185)


def test_small_m_setting_out_of_range_is_refused_at_import():
    """Token sets are int32 bit sets: MMFAST_ATTENTION_SMALL_M above 32 is a clear error."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, MMFAST_ATTENTION_SMALL_M="64")
    proc = subprocess.run([sys.executable, "-c", "import mmfast.kernels.subset_attention_small"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "MMFAST_ATTENTION_SMALL_M must be between 0 and 32, got 64" in proc.stderr


@pytest.mark.parametrize("kind", ["row", "bank", "row_bank"])
def test_small_and_general_kernels_agree(monkeypatch, kind):
    """Up to SMALL_M tokens, the small kernel and the general one compute the same forward,
    saved lse and gradients (float64, to rounding)."""
    kernel = kernel_module()
    B, M, E, H = 3, 7, 20, 2
    q, k, v = (randn(B, M, E, seed=141 + i) for i in range(3))
    mask = make_mask(kind, B, M, seed=144)
    g = randn(*mask.shape[:-1], M, E, seed=145)
    small = run_triton(q, k, v, mask, H, g, 0.3), kernel.subset_attention_forward(
        q, k, v, mask, H, 0.3)[1]
    monkeypatch.setattr(kernel, "SMALL_M", 0)
    general = run_triton(q, k, v, mask, H, g, 0.3), kernel.subset_attention_forward(
        q, k, v, mask, H, 0.3)[1]
    (out_s, grads_s), lse_s = small
    (out_g, grads_g), lse_g = general
    torch.testing.assert_close(out_s, out_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_s, lse_g, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_s, grads_g):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["row", "bank"])
def test_half_precision_inputs(dtype, kind):
    q, k, v = (randn(3, 5, 32, seed=11 + i, dtype=dtype) for i in range(3))
    check(q, k, v, make_mask(kind, 3, 5, 14), 2, seed=15)


def test_float64_reference_on_a_bank_of_several_chunks():
    """All 256 subsets of 8 tokens: the backward sweeps them in several chunks. Values, the
    saved lse (on the rows of queries in the subset) and gradients match mmfast's float64
    reference."""
    B, M, E, H = 3, 8, 24, 2
    q, k, v = (randn(B, M, E, seed=21 + i) for i in range(3))
    mask = every_subset(M).expand(B, 2 ** M, M)
    kernel = kernel_module()
    chunk_s = small_module().small_blocks(2 ** M, M, E // H, 8, backward=True)[1]
    assert M <= kernel.SMALL_M and chunk_s < 2 ** M
    scale = 0.41
    out, lse = kernel.subset_attention_forward(q, k, v, mask, H, scale)
    ref_out, ref_lse = reference_attention(q, k, v, mask, H, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    query_in = mask[:, :, None, :].expand_as(lse)
    torch.testing.assert_close(lse[query_in], ref_lse[query_in], rtol=1e-12, atol=1e-12)
    assert torch.equal(lse[~query_in], torch.zeros_like(lse[~query_in]))

    g = randn(*out.shape, seed=24)
    _, grads = run_triton(q, k, v, mask, H, g, scale)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with mmfast.use_backend("reference"):
        want = torch.autograd.grad(subset_attention(*leaves, mask, H, scale), leaves, g)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10)


def test_sixty_four_tokens_and_head_dim_128():
    B, M, E, H = 2, 64, 128, 1
    q, k, v = (randn(B, M, E, seed=31 + i, dtype=torch.float32) for i in range(3))
    bank = edge_bank(M, 2, seed=34)[[0, 1, 2, M + 2, M + 3]]     # empty, full, {0}, 2 random
    check(q[:1], k[:1], v[:1], bank.expand(1, *bank.shape), H, seed=35)
    check(q, k, v, random_mask(B, M, seed=36), H, seed=37)


def test_singletons_have_closed_form_values_and_gradients():
    """A token alone in its subset attends only to itself: out = v_m exactly; its softmax has
    one entry, so dq = dk = 0 and dv_m = Σ over the singleton subsets {m} of dout."""
    B, M, E, H = 3, 5, 12, 3
    q, k, v = (randn(B, M, E, seed=41 + i) for i in range(3))
    singles = torch.eye(M, dtype=torch.bool, device=DEVICE).expand(B, M, M)
    g = randn(B, M, M, E, seed=44)
    out, (dq, dk, dv) = run_triton(q, k, v, singles, H, g)
    for m in range(M):
        assert torch.equal(out[:, m, m], v[:, m])
        others = [i for i in range(M) if i != m]
        assert torch.equal(out[:, m, others], torch.zeros_like(out[:, m, others]))
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    torch.testing.assert_close(dv, g.diagonal(dim1=1, dim2=2).transpose(1, 2), rtol=0, atol=1e-15)


def test_empty_subsets_give_zeros_everywhere():
    B, M, E, H = 3, 4, 8, 2
    q, k, v = (randn(B, M, E, seed=51 + i) for i in range(3))
    for mask in (torch.zeros(B, M, dtype=torch.bool, device=DEVICE),
                 torch.zeros(B, 3, M, dtype=torch.bool, device=DEVICE),
                 torch.zeros(B, 0, M, dtype=torch.bool, device=DEVICE)):
        g = randn(*mask.shape[:-1], M, E, seed=54)
        out, grads = run_triton(q, k, v, mask, H, g)
        assert out.shape == (*mask.shape[:-1], M, E)
        assert torch.equal(out, torch.zeros_like(out))
        for grad in grads:
            assert torch.equal(grad, torch.zeros_like(grad))
        _, lse = kernel_module().subset_attention_forward(q, k, v, mask, H, 0.5)
        assert torch.equal(lse, torch.zeros_like(lse))


def test_each_subset_has_its_own_softmax_shift():
    """Token 0's key scores ~600 above the others: with one shift per row, the subsets without
    token 0 would underflow to zero in float32. Each subset must still get its own softmax."""
    B, M, E, H = 2, 5, 8, 1
    q, k, v = (randn(B, M, E, seed=61 + i, dtype=torch.float32) for i in range(3))
    q = q.abs() + 1.0
    k[:, 0] = 200.0
    bank = every_subset(M)[1:]
    check(q, k, v, bank.expand(B, *bank.shape), H, seed=64)
    out, _ = run_triton(q, k, v, bank.expand(B, *bank.shape), H,
                        torch.zeros(B, bank.shape[0], M, E, device=DEVICE))
    assert torch.isfinite(out).all()


def test_stride_zero_banks_and_non_contiguous_inputs():
    B, M, E, H = 3, 5, 12, 2
    packed = randn(B, M, 3 * E, seed=71)
    q, k, v = packed.chunk(3, dim=-1)                    # views with row stride 3E, as from a
    assert not q.is_contiguous()                         # fused qkv projection
    bank = every_subset(M)[::3]                          # [11, 5], stride 3 rows of the table
    mask = bank.t().contiguous().t().expand(B, *bank.shape)   # column-major bank, stride 0 on B
    assert mask.stride(0) == 0 and mask.stride(2) != 1
    check(q, k, v, mask, H, seed=72)
    row = random_mask(M, B, seed=73).t()                 # [B, M] transposed
    check(q, k, v, row, H, seed=74)

    # A non-contiguous upstream gradient: a stride-0 expansion and a transposed tensor.
    g_row = randn(E, seed=75).expand(B, bank.shape[0], M, E)
    g_t = randn(B, bank.shape[0], E, M, seed=76).transpose(2, 3)
    for g in (g_row, g_t):
        _, grads = run_triton(q, k, v, mask, H, g)
        want = expected_grads(q, k, v, mask, H, 1.0 / math.sqrt(E // H), g)
        for got, w in zip(grads, want):
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["row", "bank", "row_bank"])
def test_tokens_outside_every_subset_are_never_read(kind):
    """NaN in the features of tokens in none of a row's subsets, and NaN in the upstream
    gradient of rows outside a subset (its output rows are constant zeros), leave values and
    gradients finite; those tokens get exact zero gradients."""
    B, M, E, H = 4, 5, 8, 2
    mask = make_mask(kind, B, M, seed=81).clone()
    mask[..., M - 1] = False
    mask[2:, ..., 1] = False
    unused = ~as_bank(mask).any(dim=1)                                   # [B, M]
    clean = [randn(B, M, E, seed=82 + i) for i in range(3)]
    dirty = [torch.where(unused[..., None], float("nan"), t) for t in clean]
    g = randn(*mask.shape[:-1], M, E, seed=85)
    g_dirty = torch.where(mask[..., None], g, float("nan"))
    out, grads = run_triton(*dirty, mask, H, g_dirty)
    expected, _ = brute_attention(*clean, mask, H, 0.5)
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    want = expected_grads(*clean, mask, H, 0.5, g)
    for got, w in zip(grads, want):
        assert torch.isfinite(got).all()
        assert torch.equal(got[unused], torch.zeros_like(got[unused]))
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10)


def test_inputs_not_mutated():
    q, k, v = (randn(3, 4, 6, seed=91 + i) for i in range(3))
    mask = random_mask(3, 2, 4, seed=94)
    g = randn(3, 2, 4, 6, seed=95)
    before = [t.clone() for t in (q, k, v, mask, g)]
    run_triton(q, k, v, mask, 2, g)
    for old, new in zip(before, (q, k, v, mask, g)):
        assert torch.equal(old, new)


@pytest.mark.parametrize("kind", ["row", "bank", "row_bank"])
def test_gradcheck(kind):
    """Fast mode (random projections of the Jacobian): a few interpreted calls, not one per
    element; the full Jacobian is checked on the smallest bank below."""
    q, k, v = (randn(2, 3, 4, seed=101 + i).requires_grad_(True) for i in range(3))
    mask = make_mask(kind, 2, 3, seed=104)
    with mmfast.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda a, b, c: subset_attention(a, b, c, mask, 2),
                                        (q, k, v), fast_mode=True)


def test_gradcheck_full_jacobian():
    q, k, v = (randn(1, 3, 2, seed=105 + i).requires_grad_(True) for i in range(3))
    bank = every_subset(3)[1:].expand(1, 7, 3)
    with mmfast.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda a, b, c: subset_attention(a, b, c, bank, 2),
                                        (q, k, v))


def test_backward_is_bitwise_deterministic():
    B, M, E, H = 3, 8, 32, 2
    q, k, v = (randn(B, M, E, seed=111 + i, dtype=torch.float32) for i in range(3))
    mask = every_subset(M)[1:].expand(B, 2 ** M - 1, M)
    g = randn(B, 2 ** M - 1, M, E, seed=114, dtype=torch.float32)
    first = run_triton(q, k, v, mask, H, g)
    for _ in range(2):
        again = run_triton(q, k, v, mask, H, g)
        assert torch.equal(again[0], first[0])
        for a, b in zip(again[1], first[1]):
            assert torch.equal(a, b)


def test_self_attention_aggregator_runs_the_kernel(monkeypatch):
    """mmfast.nn.SelfAttention reaches the kernel through mmfast.ops.subset_attention, and its
    posterior matches the one computed on the reference backend."""
    nn = pytest.importorskip("mmfast.nn")
    if not hasattr(nn, "SelfAttention"):
        pytest.skip("mmfast.nn.SelfAttention does not exist yet")
    kernel = kernel_module()
    calls = []
    original = kernel.subset_attention_forward

    def counted(*args):
        calls.append(args[3].shape)
        return original(*args)

    monkeypatch.setattr(kernel, "subset_attention_forward", counted)
    torch.manual_seed(0)
    model = nn.SelfAttention(feature_dim=6, latent_dim=3, width=16, num_heads=4, hidden=16)
    model = model.to(DEVICE, F64)
    features = randn(3, 4, 6, seed=121)
    bank = every_subset(4).expand(3, 16, 4)
    with mmfast.use_backend("triton"):
        fused = model(features, bank)
    assert calls and calls[0] == bank.shape
    with mmfast.use_backend("reference"):
        plain = model(features, bank)
    torch.testing.assert_close(fused.mean, plain.mean, rtol=1e-10, atol=1e-10)


# --- GPU only -------------------------------------------------------------------------------

def _gpu_case(B, M, E, S, seed, dtype):
    q, k, v = (randn(B, M, E, seed=seed + i, dtype=dtype) for i in range(3))
    if S is None:
        mask = random_mask(B, M, seed=seed + 3)
    elif S == 2 ** M - 1:
        mask = every_subset(M)[1:].expand(B, S, M)
    else:
        mask = random_mask(S, M, seed=seed + 3).expand(B, S, M)
    return q, k, v, mask


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,M,E,H,S", [(257, 8, 256, 4, 255), (1000, 3, 512, 8, None),
                                       (33, 64, 512, 4, 40), (2, 8, 128, 4, 255)])
def test_cuda_low_precision_tolerances(B, M, E, H, S, dtype):
    """Against mmfast's float64 reference on the GPU, at benchmark-like shapes (the last one
    splits each row's subsets over several programs)."""
    q, k, v, mask = _gpu_case(B, M, E, S, seed=131, dtype=dtype)
    g = randn(*mask.shape[:-1], M, E, seed=135, dtype=dtype)
    out, grads = run_triton(q, k, v, mask, H, g)
    wide = [t.to(F64).requires_grad_(True) for t in (q, k, v)]
    scale = 1.0 / math.sqrt(E // H)
    expected, _ = reference_attention(*wide, mask, H, scale)
    want = torch.autograd.grad(expected, wide, g.to(F64))
    rtol, atol = TOL[dtype] if dtype != torch.float32 else (1e-4, 1e-4)
    torch.testing.assert_close(out.to(F64), expected, rtol=rtol, atol=atol)
    grtol, gatol = GRAD_TOL[dtype]
    subsets = as_bank(mask).shape[1]
    for got, w in zip(grads, want):
        torch.testing.assert_close(got.to(F64), w, rtol=grtol, atol=gatol * subsets ** 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_identical_over_100_repeats(dtype):
    q, k, v, mask = _gpu_case(512, 8, 256, 255, seed=141, dtype=dtype)
    g = randn(512, 255, 8, 256, seed=145, dtype=dtype)
    first = run_triton(q, k, v, mask, 4, g)
    for _ in range(100):
        again = run_triton(q, k, v, mask, 4, g)
        assert torch.equal(again[0], first[0])
        for a, b in zip(again[1], first[1]):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_float64():
    q, k, v, mask = _gpu_case(64, 5, 96, 31, seed=151, dtype=F64)
    g = randn(64, 31, 5, 96, seed=155)
    out, grads = run_triton(q, k, v, mask, 4, g)
    wide = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected, _ = reference_attention(*wide, mask, 4, 1.0 / math.sqrt(24))
    torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    for got, w in zip(grads, torch.autograd.grad(expected, wide, g)):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-10)


@pytest.fixture
def float32_matmul_precision():
    """Sets torch's float32 matmul precision for one test and restores it afterwards."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def test_float32_dots_follow_torchs_matmul_precision(float32_matmul_precision):
    """float32 dots keep full precision by default and use TF32 only once the user allows it
    for float32 matmuls; float64 never truncates, half types always run as TF32."""
    kernel = kernel_module()
    float32_matmul_precision("highest")
    assert kernel._precision(torch.float32) == "ieee"
    for setting in ("high", "medium"):
        float32_matmul_precision(setting)
        assert kernel._precision(torch.float32) == "tf32"
        assert kernel._precision(torch.float64) == "ieee"
        assert kernel._precision(torch.bfloat16) == "tf32"


@pytest.mark.cuda
def test_cuda_float32_with_tf32_allowed(float32_matmul_precision):
    """With TF32 allowed, float32 results hold TF32's accuracy (10 mantissa bits on the dot
    operands) against the float64 reference."""
    float32_matmul_precision("high")
    q, k, v, mask = _gpu_case(257, 8, 256, 255, seed=161, dtype=torch.float32)
    g = randn(257, 255, 8, 256, seed=165, dtype=torch.float32)
    out, grads = run_triton(q, k, v, mask, 4, g)
    wide = [t.to(F64).requires_grad_(True) for t in (q, k, v)]
    expected, _ = reference_attention(*wide, mask, 4, 1.0 / math.sqrt(64))
    torch.testing.assert_close(out.to(F64), expected, rtol=5e-3, atol=5e-3)
    for got, w in zip(grads, torch.autograd.grad(expected, wide, g.to(F64))):
        torch.testing.assert_close(got.to(F64), w, rtol=1e-2, atol=1e-2 * 255 ** 0.5)
