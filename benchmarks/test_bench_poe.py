"""Benchmarks of ``gaussian_poe`` with the N(0, I) prior expert: per-sample masks ``[B, M]`` and
the all-subsets bank ``[B, 2^M - 1, M]`` (stride 0), float32, latent size d.

Providers (benchmarks/conftest.py): ``eager`` is the straightforward PyTorch a user would write,
precisions by ``exp`` and the per-subset sums by a batched matmul against the subset matrix
(:func:`eager_poe`; the library's reference materialises ``[B, S, M, d]`` for its log-sum-exp and
would be an unfair baseline); ``compile`` is ``torch.compile`` of that same function; ``mmfast``
the Triton kernels (GPU only). Minimum bytes: the mu and logvar rows some subset holds, read
once, the mask's storage, both outputs written once; the backward reads both upstream
gradients (and the inputs) and writes both input gradients.
On CPU only B = 256, d = 64 runs, so the suite stays quick and cannot rot.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, make_mask, provider_fn, run_case
from mmfast.ops import gaussian_poe


MEMORY_CAP = 24 * 2**30      # skip a case whose outputs and gradients would exceed this

if HAS_CUDA:
    CASES = ([("per-sample", B, M, d) for B in (256, 4096) for M in (3, 8, 16) for d in (64, 512)]
             + [("all-subsets", B, M, d) for B in (256, 4096) for M in (3, 8, 12)
                for d in (64, 512)])
else:
    CASES = [("per-sample", 256, 8, 64), ("all-subsets", 256, 3, 64), ("all-subsets", 256, 8, 64)]


def eager_poe(mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor,
              prior_mu: torch.Tensor, prior_logvar: torch.Tensor):
    """Precision-weighted product over each subset plus the prior expert.

    mu, logvar ``[B, M, d]``; mask ``[B, (S,) M]``; prior_mu, prior_logvar ``[B, d]``.
    Returns ``(mu, logvar)`` ``[B, (S,) d]``.
    """
    weights = (mask if mask.dim() == 3 else mask.unsqueeze(1)).to(mu.dtype)   # [B, S, M]
    precision = torch.exp(-logvar)
    prior_precision = torch.exp(-prior_logvar).unsqueeze(1)
    total = torch.matmul(weights, precision) + prior_precision
    weighted = torch.matmul(weights, precision * mu) + prior_precision * prior_mu.unsqueeze(1)
    out_mu, out_logvar = weighted / total, -torch.log(total)
    if mask.dim() == 2:
        return out_mu[:, 0], out_logvar[:, 0]
    return out_mu, out_logvar


def mmfast_poe(mu, logvar, mask, prior_mu, prior_logvar):
    return gaussian_poe(mu, logvar, mask, prior=True)


def min_bytes(mode: str, mu: torch.Tensor, mask: torch.Tensor) -> int:
    B, M, d = mu.shape
    item = mu.element_size()
    rows_read = int((mask if mask.dim() == 3 else mask.unsqueeze(1)).any(dim=1).sum())
    mask_bytes = mask.untyped_storage().nbytes()
    outputs = 2 * mask.shape[:-1].numel() * d * item
    forward = 2 * rows_read * d * item + mask_bytes + outputs
    backward = outputs + 2 * rows_read * d * item + mask_bytes + 2 * B * M * d * item
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


@pytest.mark.parametrize("kind,B,M,d", CASES)
def test_gaussian_poe(benchmark, provider, mode, kind, B, M, d):
    mask = make_mask(kind, B, M)
    S = 1 if mask.dim() == 2 else mask.shape[1]
    if 2 * B * S * d * 4 * (1 if mode == "forward" else 3) > MEMORY_CAP:
        pytest.skip(f"2 x [{B}, {S}, {d}] float32 outputs and gradients exceed the memory cap")
    benchmark.group = f"gaussian_poe {kind} B={B} M={M} S={S} d={d} {mode}"
    g = torch.Generator().manual_seed(0)
    zero = torch.zeros((), device=DEVICE).expand(B, d)      # the N(0, I) expert, by strides

    def make_inputs():
        grad = mode != "forward"
        mu = torch.randn(B, M, d, generator=g).to(DEVICE).requires_grad_(grad)
        logvar = (torch.rand(B, M, d, generator=g) * 6 - 3).to(DEVICE).requires_grad_(grad)
        return mu, logvar, mask, zero, zero

    mu = make_inputs()[0]
    run_case(benchmark, provider_fn(provider, eager_poe, mmfast_poe), make_inputs, mode,
             min_bytes(mode, mu, mask), provider=provider, kind=kind, B=B, M=M, S=S, d=d,
             dtype="float32", eager="exp + matmul against the subset matrix")
