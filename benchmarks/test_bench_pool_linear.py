"""Benchmarks of ``subset_pool_linear`` (the first linear layer of ρ over every subset's sum):
the all-subsets bank ``[B, 2^M - 1, M]`` (stride 0) and per-sample masks, float32, 256 outputs.

Providers (benchmarks/conftest.py): ``eager`` pools with one einsum against the subset matrix,
then ``F.linear`` (what SumPooling does without the fused op; :func:`eager_pool_linear`, not
mmfast's reference, which materialises ``[B, S, M, D]`` for exact non-finite semantics);
``compile`` is ``torch.compile`` of it; ``mmfast`` the op on the triton backend, which for a
bank transforms the M rows once and pools the transformed rows with the kernel (GPU only). Minimum bytes: the g rows some subset holds, W, b and the
mask's storage read once, the ``[B, S, out]`` result written once; the backward reads the
upstream gradient, g and W and writes the gradients of g, W and b.
On CPU only B = 256, D = 64 runs, so the suite stays quick and cannot rot.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, make_mask, provider_fn, run_case
from mmfast.ops import subset_pool_linear


MEMORY_CAP = 24 * 2**30      # skip a case whose tensors would exceed this
OUT = 256                    # width of ρ's first layer (the paper's hidden size)

if HAS_CUDA:
    CASES = ([("all-subsets", B, M, D) for B in (256, 4096) for M in (3, 8, 12)
              for D in (64, 512)]
             + [("per-sample", B, 8, D) for B in (256, 4096) for D in (64, 512)])
else:
    CASES = [("all-subsets", 256, 8, 64), ("per-sample", 256, 8, 64)]


def eager_pool_linear(g: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """Rows of modalities in no subset zeroed, one einsum against the subset matrix, then
    ``F.linear`` on every pooled row."""
    bank = mask if mask.dim() == 3 else mask.unsqueeze(1)
    rows = torch.where(bank.any(dim=1).unsqueeze(-1), g, 0.0)
    pooled = torch.einsum("bsm,bmd->bsd", bank.to(g.dtype), rows)
    out = torch.nn.functional.linear(pooled, weight, bias)
    return out if mask.dim() == 3 else out[:, 0]


def min_bytes(mode: str, g: torch.Tensor, mask: torch.Tensor) -> int:
    B, M, D = g.shape
    item = g.element_size()
    rows_read = int((mask if mask.dim() == 3 else mask.unsqueeze(1)).any(dim=1).sum())
    params = (OUT * D + OUT) * item
    mask_bytes = mask.untyped_storage().nbytes()
    out = mask.shape[:-1].numel() * OUT * item
    forward = rows_read * D * item + params + mask_bytes + out
    backward = out + rows_read * D * item + params + mask_bytes + B * M * D * item + params
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


@pytest.mark.parametrize("kind,B,M,D", CASES)
def test_subset_pool_linear(benchmark, provider, mode, kind, B, M, D):
    mask = make_mask(kind, B, M)
    S = 1 if mask.dim() == 2 else mask.shape[1]
    # The eager reference holds the pooled [B, S, D] and the [B, S, out] result (and gradients).
    if B * S * (D + OUT) * 4 * (1 if mode == "forward" else 2) > MEMORY_CAP:
        pytest.skip(f"[{B}, {S}, {D} + {OUT}] float32 intermediates exceed the memory cap")
    benchmark.group = f"subset_pool_linear {kind} B={B} M={M} S={S} D={D} out={OUT} {mode}"
    gen = torch.Generator().manual_seed(0)
    grad = mode != "forward"
    weight = (torch.randn(OUT, D, generator=gen) / D ** 0.5).to(DEVICE).requires_grad_(grad)
    bias = torch.randn(OUT, generator=gen).to(DEVICE).requires_grad_(grad)

    def make_inputs():
        g = torch.randn(B, M, D, generator=gen).to(DEVICE).requires_grad_(grad)
        return g, mask, weight, bias

    g = make_inputs()[0]
    run_case(benchmark, provider_fn(provider, eager_pool_linear, subset_pool_linear),
             make_inputs, mode, min_bytes(mode, g, mask), provider=provider, kind=kind, B=B, M=M,
             S=S, D=D, out=OUT, dtype="float32")
