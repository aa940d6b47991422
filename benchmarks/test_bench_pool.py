"""Benchmarks of ``subset_sum_pool``: per-sample masks ``[B, M]`` and the all-subsets bank
``[B, 2^M - 1, M]`` (stride 0), float32.

Providers (benchmarks/conftest.py): ``eager`` is a float32 einsum against the subset matrix
(:func:`eager_pool`; not mmfast's reference, which masks each subset separately through a
materialised ``[B, S, M, D]`` for exact non-finite semantics), ``compile`` is
``torch.compile`` of it, ``mmfast`` the Triton kernels (GPU only).
Minimum bytes: the x rows that some subset holds, read once, the mask's storage, the output
written once; the backward reads the upstream gradient and writes grad_x.
On CPU only B = 256, D = 64 runs, so the suite stays quick and cannot rot.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, make_mask, provider_fn, run_case
from mmfast.ops import subset_sum_pool


MEMORY_CAP = 24 * 2**30      # skip a case whose output alone would exceed this

if HAS_CUDA:
    CASES = ([("per-sample", B, M, D) for B in (256, 4096) for M in (3, 8, 16) for D in (64, 512)]
             + [("all-subsets", B, M, D) for B in (256, 4096) for M in (3, 8, 12)
                for D in (64, 512)])
else:
    CASES = [("per-sample", 256, 8, 64), ("all-subsets", 256, 3, 64), ("all-subsets", 256, 8, 64)]


def eager_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a user would write: rows of modalities in no subset zeroed (NaN-safe for missing
    modalities), then one einsum against the subset matrix."""
    bank = mask if mask.dim() == 3 else mask.unsqueeze(1)
    rows = torch.where(bank.any(dim=1).unsqueeze(-1), x, 0.0)
    out = torch.einsum("bsm,bmd->bsd", bank.to(x.dtype), rows)
    return out if mask.dim() == 3 else out[:, 0]


def min_bytes(mode: str, x: torch.Tensor, mask: torch.Tensor) -> int:
    """Traffic a perfect implementation must move in ``mode``."""
    B, M, D = x.shape
    item = x.element_size()
    rows_read = int((mask if mask.dim() == 3 else mask.unsqueeze(1)).any(dim=1).sum())
    mask_bytes = mask.untyped_storage().nbytes()
    out = mask.shape[:-1].numel() * D * item
    forward = rows_read * D * item + mask_bytes + out
    backward = out + mask_bytes + B * M * D * item
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


@pytest.mark.parametrize("kind,B,M,D", CASES)
def test_subset_sum_pool(benchmark, provider, mode, kind, B, M, D):
    mask = make_mask(kind, B, M)
    S = 1 if mask.dim() == 2 else mask.shape[1]
    if B * S * D * 4 * (1 if mode == "forward" else 3) > MEMORY_CAP:
        pytest.skip(f"[{B}, {S}, {D}] float32 outputs and gradients exceed the memory cap")
    benchmark.group = f"subset_sum_pool {kind} B={B} M={M} S={S} D={D} {mode}"
    g = torch.Generator().manual_seed(0)

    def make_inputs():
        x = torch.randn(B, M, D, generator=g).to(DEVICE).requires_grad_(mode != "forward")
        return x, mask

    x, _ = make_inputs()
    run_case(benchmark, provider_fn(provider, eager_pool, subset_sum_pool), make_inputs,
             mode, min_bytes(mode, x, mask), provider=provider, kind=kind, B=B, M=M, S=S, D=D,
             dtype="float32")
