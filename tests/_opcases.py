"""Shared helpers of the op tests (tests/test_ops_*.py): seeded inputs, subset masks of every
kind, backend/shape parametrisation, tolerances and the no-mutation check.

Nothing here computes an expected result: each test file writes its own brute force.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import DEVICE

F64 = torch.float64

# (rtol, atol) against a float64 brute force, for outputs of a few dozen summed terms.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 1e-1),
}

# Masks: one subset per row, a stride-0 bank shared by every row, and a per-row bank.
MASK_KINDS = ("row", "shared_bank", "row_bank")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, gen: torch.Generator, dtype=F64, scale: float = 1.0, shift: float = 0.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Seeded normal draws, made on the CPU (reproducible everywhere) then moved to DEVICE."""
    t = (torch.randn(shape, generator=gen, dtype=F64) * scale + shift).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


def uniform(*shape, gen: torch.Generator, low: float, high: float, dtype=F64,
            requires_grad: bool = False) -> torch.Tensor:
    t = (torch.rand(shape, generator=gen, dtype=F64) * (high - low) + low).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


def every_subset(M: int) -> torch.Tensor:
    """bool ``[2^M, M]``: every subset (empty and full included), enumerated with itertools so
    the tests do not depend on mmfast.subsets."""
    return torch.tensor(list(itertools.product([False, True], repeat=M)), dtype=torch.bool,
                        device=DEVICE).reshape(2 ** M, M)


def make_mask(kind: str, B: int, M: int, gen: torch.Generator, max_subsets: int = 8) -> torch.Tensor:
    """A subset mask of the given kind with the edge cases built in.

    ``row``: ``[B, M]``, row 0 empty, row 1 full, the rest random.
    ``shared_bank``: ``[S, M]`` bank expanded to ``[B, S, M]`` with stride 0: every subset when
    ``2^M <= max_subsets``, else the empty set, the full set, every singleton... cut to
    ``max_subsets`` rows, padded with random subsets.
    ``row_bank``: contiguous ``[B, S, M]``, row 0 entirely empty (a fully masked row), row 1
    holds the full set, the rest random.
    """
    if kind == "row":
        mask = torch.rand(B, M, generator=gen) < 0.5
        mask[0] = False
        if B > 1:
            mask[1] = True
        return mask.to(DEVICE)
    if kind == "shared_bank":
        if 2 ** M <= max_subsets:
            bank = every_subset(M)
        else:
            rows = [torch.zeros(M, dtype=torch.bool), torch.ones(M, dtype=torch.bool)]
            rows += [torch.rand(M, generator=gen) < 0.5 for _ in range(max_subsets - 2)]
            bank = torch.stack(rows).to(DEVICE)
        mask = bank.expand(B, *bank.shape)
        assert B == 1 or mask.stride(0) == 0
        return mask
    if kind == "row_bank":
        S = min(max_subsets, 4)
        mask = torch.rand(B, S, M, generator=gen) < 0.5
        mask[0] = False
        if B > 1:
            mask[1, 0] = True
        return mask.to(DEVICE)
    raise ValueError(kind)


def nan_test_mask(kind: str, B: int, M: int, gen: torch.Generator) -> torch.Tensor:
    """A mask in which some modalities are in none of a row's subsets: modality M-1 for every
    row (the shared bank only covers the first M-1), modality 1 too from row 2 on."""
    if kind == "shared_bank":
        bank = make_mask("shared_bank", 1, M - 1, gen)[0]
        return torch.cat([bank, bank.new_zeros(bank.shape[0], 1)], dim=1).expand(B, -1, -1)
    mask = make_mask(kind, B, M, gen)
    mask[..., M - 1] = False
    mask[2:, ..., 1] = False
    return mask


def mask_bank(mask: torch.Tensor) -> list[list[list[int]]]:
    """The members of every subset as Python lists: ``[b][s] -> [m, ...]`` (S = 1 for a
    ``[B, M]`` mask)."""
    bank = mask if mask.dim() == 3 else mask.unsqueeze(1)
    return [[[m for m, inside in enumerate(sub) if inside] for sub in row] for row in bank.tolist()]


def unused_modalities(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, M]``: modalities in none of the row's subsets."""
    bank = mask if mask.dim() == 3 else mask.unsqueeze(1)
    return ~bank.any(dim=1)


def cases(reference_cases, triton_cases):
    """Parametrise ``backend`` (indirectly, through the conftest fixture) jointly with shapes, so
    the interpreted triton backend only gets the small ones."""
    def param(backend, case):
        marks = ()
        if isinstance(case, type(pytest.param(None))):      # a pytest.param carrying marks
            case, marks = case.values, case.marks
        values = case if isinstance(case, tuple) else (case,)
        return pytest.param(backend, *values, marks=marks)
    return ([param("reference", c) for c in reference_cases]
            + [param("triton", c) for c in triton_cases])


def grads(outputs, inputs, cotangents):
    """Gradients of ``Σ_i <outputs_i, cotangents_i>`` w.r.t. ``inputs`` (None where unused)."""
    total = sum((o.to(F64) * g.to(F64)).sum() for o, g in zip(outputs, cotangents))
    return torch.autograd.grad(total, inputs, allow_unused=True)


def cotangent_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random, non-unit upstream gradient for ``t``."""
    return randn(*t.shape, gen=gen, dtype=t.dtype, scale=1.7, shift=0.3)


def snapshot(*tensors):
    return [None if t is None else t.detach().clone() for t in tensors]


def assert_unchanged(before, tensors) -> None:
    """Inputs are never mutated (values compared bitwise, NaN equal to NaN)."""
    for old, new in zip(before, tensors):
        if old is None:
            continue
        assert torch.equal(old.isnan(), new.detach().isnan())
        assert torch.equal(torch.nan_to_num(old), torch.nan_to_num(new.detach())), "input was mutated"


def close(actual: torch.Tensor, expected: torch.Tensor, dtype=F64, scale: float = 1.0) -> None:
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=atol * scale)


def gradcheck(fn, inputs, backend: str) -> bool:
    """``torch.autograd.gradcheck`` in float64; on the interpreted triton backend in fast mode
    (random projections of the Jacobian), which costs a few calls instead of one per element."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")
