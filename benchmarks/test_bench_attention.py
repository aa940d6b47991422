"""Benchmarks of ``subset_attention`` (masked multi-head self-attention over modality tokens) and
of the whole SelfAttention aggregator that uses it.

Op cases: per-sample masks ``[B, M]`` and the all-subsets bank ``[B, 2^M - 1, M]`` (stride 0)
for M = 8; q, k, v ``[B, M, E]`` with 4 or 8 heads. Providers:

- ``eager``: the batched-matmul formulation a user would write (:func:`eager_attention`): the
  scores once per sample, masked per subset, softmax, a matmul with V, query rows zeroed;
- ``compile``: ``torch.compile(eager_attention, dynamic=False)``;
- ``sdpa``: ``F.scaled_dot_product_attention`` with a boolean key mask, the subsets folded into
  the batch (q, k, v repeated per subset), query rows zeroed (:func:`sdpa_attention`);
- ``mmfast``: the public op on the triton backend (GPU only).

Aggregator cases: ``mmfast.nn.SelfAttention`` (token MLP, one pre-LN attention block with its
projections and FFN, final LayerNorm, masked sum, ρ) at width 256 and 4 heads, on the reference
backend (``eager``), compiled on the reference backend (``compile``) and on the triton backend
(``mmfast``); its ``attention_group`` extra_info names the op case of the same shape, so the
kernel's share of the aggregator's time can be read off.

Minimum bytes (op): q, k, v read once, the mask's storage, the output written once; the backward
reads the upstream gradient (and q, k, v) and writes dq, dk, dv. Masks of the per-sample cases
are never empty, so every provider computes the same finite result (SDPA gives NaN rows for a
subset with no keys). A case that runs out of GPU memory is skipped with that reason.
On CPU only the reference providers run, at B = 256, E = 128 (M = 8 per-sample, M = 3 bank) and
for the aggregator at B = 128, M = 3, so the suite stays quick and cannot rot.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmfast
from conftest import DEVICE, HAS_CUDA, compiled, make_mask, provider_fn, providers, run_case
from mmfast.ops import subset_attention

if HAS_CUDA:
    OP_CASES = ([("per-sample", B, M, E, H, "float32") for B in (256, 4096) for M in (3, 8, 16)
                 for E in (128, 512) for H in (4, 8)]
                + [("all-subsets", B, 8, E, H, "float32") for B in (256, 4096) for E in (128, 512)
                   for H in (4, 8)]
                # The aggregator's shape (E = 256, 4 heads); B = 4096 is the target,
                # in bfloat16 too.
                + [(kind, B, 8, 256, 4, dtype) for kind in ("all-subsets", "per-sample")
                   for B, dtype in ((256, "float32"), (4096, "float32"), (4096, "bfloat16"))])
    AGGREGATOR_CASES = [(kind, B, 8) for kind in ("per-sample", "all-subsets") for B in (256, 4096)]
else:
    OP_CASES = [("per-sample", 256, 8, 128, 4, "float32"),
                ("all-subsets", 256, 3, 128, 4, "float32")]
    AGGREGATOR_CASES = [("per-sample", 128, 3), ("all-subsets", 128, 3)]

WIDTH, HEADS, FEATURES, LATENT = 256, 4, 128, 32      # aggregator: paper-code width and heads


def as_bank(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dim() == 3 else mask.unsqueeze(1)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, M, E]`` -> ``[B, H, M, E / H]``."""
    B, M, E = t.shape
    return t.view(B, M, num_heads, E // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, M, Dh]`` -> ``[B, (S,) M, E]`` with rows of tokens outside the subset zeroed."""
    B, S, H, M, Dh = t.shape
    out = t.transpose(2, 3).reshape(B, S, M, H * Dh) * as_bank(mask).unsqueeze(-1)
    return out if mask.dim() == 3 else out[:, 0]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    num_heads: int) -> torch.Tensor:
    """Subset attention with batched matmuls: q, k, v ``[B, M, E]``, mask ``[B, (S,) M]`` ->
    ``[B, (S,) M, E]``. Masked keys get the dtype's lowest value (not -inf) so that a subset
    with no keys stays finite; its rows are zeroed with the query mask."""
    qh, kh, vh = (split_heads(t, num_heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(qh.shape[-1])
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale                 # [B, H, M, M], once
    keys = as_bank(mask)[:, :, None, None, :]                                # [B, S, 1, 1, M]
    masked = scores.unsqueeze(1).masked_fill(~keys, torch.finfo(scores.dtype).min)
    probs = torch.softmax(masked, dim=-1)                                    # [B, S, H, M, M]
    return merge_heads(torch.matmul(probs, vh.unsqueeze(1)), mask)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   num_heads: int) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the subsets folded into the batch: q, k, v are
    repeated per subset as ``[B·S, H, M, Dh]`` and a boolean ``[B·S, 1, 1, M]`` key mask."""
    bank = as_bank(mask)
    B, S, M = bank.shape

    def fold(t: torch.Tensor) -> torch.Tensor:
        heads = split_heads(t, num_heads)
        return heads.unsqueeze(1).expand(B, S, *heads.shape[1:]).reshape(B * S, *heads.shape[1:])

    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v),
                                         attn_mask=bank.reshape(B * S, 1, 1, M))
    return merge_heads(out.view(B, S, *out.shape[1:]), mask)


def mmfast_attention(q, k, v, mask, num_heads):
    return subset_attention(q, k, v, mask, num_heads)


def attention_fn(provider: str):
    if provider == "sdpa":
        return sdpa_attention
    return provider_fn(provider, eager_attention, mmfast_attention)


@pytest.fixture(params=[p for p in providers() if p != "mmfast"] + ["sdpa"]
                + [p for p in providers() if p == "mmfast"])
def attention_provider(request):
    return request.param


def min_bytes(mode: str, q: torch.Tensor, mask: torch.Tensor) -> int:
    B, M, E = q.shape
    item = q.element_size()
    mask_bytes = mask.untyped_storage().nbytes()
    inputs = 3 * B * M * E * item
    out = mask.shape[:-1].numel() * M * E * item
    forward = inputs + mask_bytes + out
    backward = out + inputs + mask_bytes + inputs
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


def op_group(kind: str, B: int, M: int, S: int, E: int, H: int, dtype: str, mode: str) -> str:
    return f"subset_attention {kind} B={B} M={M} S={S} E={E} H={H} {dtype} {mode}"


def run_or_skip(*args, **kwargs) -> None:
    """:func:`run_case`, skipping a case that does not fit in GPU memory."""
    try:
        run_case(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("out of GPU memory")


@pytest.mark.parametrize("kind,B,M,E,H,dtype", OP_CASES)
def test_subset_attention(benchmark, attention_provider, mode, kind, B, M, E, H, dtype):
    mask = make_mask(kind, B, M, nonempty=True)
    S = as_bank(mask).shape[1]
    torch_dtype = getattr(torch, dtype)
    benchmark.group = op_group(kind, B, M, S, E, H, dtype, mode)
    gen = torch.Generator().manual_seed(0)
    grad = mode != "forward"

    def make_inputs():
        q, k, v = (torch.randn(B, M, E, generator=gen).to(DEVICE, torch_dtype).requires_grad_(grad)
                   for _ in range(3))
        return q, k, v, mask, H

    q = make_inputs()[0]
    run_or_skip(benchmark, attention_fn(attention_provider), make_inputs, mode,
                min_bytes(mode, q, mask), provider=attention_provider, kind=kind, B=B, M=M, S=S,
                E=E, H=H, dtype=dtype,
                eager="scores once, masked per subset, softmax, matmul with V",
                sdpa="subsets folded into the batch, boolean key mask")


def aggregator_fn(provider: str, model: torch.nn.Module):
    """The aggregator's forward as a provider times it: ``(mu, logvar)`` of the posterior."""
    def forward(features, mask):
        posterior = model(features, mask)
        return posterior.mu, posterior.logvar

    backend = "triton" if provider == "mmfast" else "reference"
    body = compiled(forward) if provider == "compile" else forward

    def run(features, mask):
        with mmfast.use_backend(backend):
            return body(features, mask)
    return run


@pytest.mark.parametrize("kind,B,M", AGGREGATOR_CASES)
def test_self_attention_aggregator(benchmark, provider, mode, kind, B, M):
    nn = pytest.importorskip("mmfast.nn")
    if not hasattr(nn, "SelfAttention"):
        pytest.skip("mmfast.nn.SelfAttention does not exist yet")
    mask = make_mask(kind, B, M, nonempty=True)
    S = as_bank(mask).shape[1]
    benchmark.group = (f"SelfAttention aggregator {kind} B={B} M={M} S={S} E={FEATURES} "
                       f"width={WIDTH} H={HEADS} {mode}")
    torch.manual_seed(0)
    model = nn.SelfAttention(feature_dim=FEATURES, latent_dim=LATENT, width=WIDTH,
                             num_heads=HEADS).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    grad = mode != "forward"

    def make_inputs():
        features = torch.randn(B, M, FEATURES, generator=gen).to(DEVICE).requires_grad_(grad)
        return features, mask

    params = sum(p.numel() for p in model.parameters()) * 4
    features_bytes = B * M * FEATURES * 4
    out_bytes = 2 * mask.shape[:-1].numel() * LATENT * 4
    forward = features_bytes + params + mask.untyped_storage().nbytes() + out_bytes
    backward = out_bytes + features_bytes + 2 * params + features_bytes
    run_or_skip(benchmark, aggregator_fn(provider, model), make_inputs, mode,
                {"forward": forward, "backward": backward,
                 "forward+backward": forward + backward}[mode],
                provider=provider, kind=kind, B=B, M=M, S=S, width=WIDTH, heads=HEADS,
                features=FEATURES, latent=LATENT, dtype="float32",
                attention_group=op_group(kind, B, M, S, WIDTH, HEADS, "float32", mode),
                eager="SelfAttention on the reference backend")
