"""Seeded inputs shared by the kernel test files: float64 draws cast to the dtype under test, so
a test's brute force sees exactly the rounded values the kernel sees."""
from __future__ import annotations

import itertools

import torch

from conftest import DEVICE

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64).to(DEVICE, dtype)


def random_mask(*shape, seed: int) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen(seed)) < 0.5).to(DEVICE)


def all_subsets_bank(M: int) -> torch.Tensor:
    """bool ``[2^M, M]``, the empty and full sets included (itertools, not mmfast.subsets)."""
    return torch.tensor(list(itertools.product([False, True], repeat=M)),
                        dtype=torch.bool, device=DEVICE).reshape(2 ** M, M)
