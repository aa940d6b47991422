"""Benchmarks of the latent log-densities: ``gaussian_log_prob`` (K samples ``[K, B, d]`` under a
per-row diagonal Gaussian ``[B, d]``, the commonest call: log q(z|x)) and ``mixture_log_prob``
(the same samples under a C = 10 component diagonal Gaussian mixture prior), float32.

Providers (benchmarks/conftest.py): ``eager`` is the plain-PyTorch reference of mmfast.ops
(broadcast ``(z − mu)² e^{−logvar}`` summed over d; the mixture with a ``[K, B, C, d]``
broadcast, ``log_softmax`` and ``logsumexp`` over C), ``compile`` is ``torch.compile`` of it,
``mmfast`` the Triton kernels (GPU only).

Minimum bytes: forward reads z ``[K, B, d]`` once and the parameters once, and writes the
``[K, B]`` float32 log-densities; backward reads the same plus the upstream ``[K, B]``
gradient and writes the gradients of z and of the parameters (the mixture's parameters are
negligible). On CPU one small case per op runs (B = 256, d = 20, K = 4), so the suite cannot
rot.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, provider_fn, run_case
from mmfast.ops import gaussian_log_prob, mixture_log_prob
from mmfast.ops import reference as ref

COMPONENTS = 10

if HAS_CUDA:
    CASES = [(4096, d, K) for d in (20, 64) for K in (1, 64)]
else:
    CASES = [(256, 20, 4)]


def min_bytes(op: str, mode: str, B: int, d: int, K: int, item: int = 4) -> int:
    samples, out = K * B * d * item, K * B * 4
    params = 2 * B * d * item if op == "gaussian" else 0
    forward = samples + params + out
    backward = (out + samples + params) + (samples + params)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


def _leaf(*shape, g, grad, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_(grad)


@pytest.mark.parametrize("B,d,K", CASES)
def test_gaussian_log_prob(benchmark, provider, mode, B, d, K):
    benchmark.group = f"gaussian_log_prob B={B} d={d} K={K} {mode}"
    g = torch.Generator().manual_seed(0)

    def make_inputs():
        grad = mode != "forward"
        return [_leaf(K, B, d, g=g, grad=grad), _leaf(B, d, g=g, grad=grad),
                _leaf(B, d, g=g, grad=grad, scale=0.5)]

    run_case(benchmark, provider_fn(provider, ref.gaussian_log_prob, gaussian_log_prob),
             make_inputs, mode, min_bytes("gaussian", mode, B, d, K), provider=provider, B=B,
             d=d, K=K, dtype="float32", eager="mmfast.ops.reference.gaussian_log_prob")


@pytest.mark.parametrize("B,d,K", CASES)
def test_mixture_log_prob(benchmark, provider, mode, B, d, K):
    benchmark.group = f"mixture_log_prob C={COMPONENTS} B={B} d={d} K={K} {mode}"
    g = torch.Generator().manual_seed(1)

    def make_inputs():
        grad = mode != "forward"
        return [_leaf(K, B, d, g=g, grad=grad), _leaf(COMPONENTS, g=g, grad=grad),
                _leaf(COMPONENTS, d, g=g, grad=grad),
                _leaf(COMPONENTS, d, g=g, grad=grad, scale=0.3)]

    run_case(benchmark, provider_fn(provider, ref.mixture_log_prob, mixture_log_prob),
             make_inputs, mode, min_bytes("mixture", mode, B, d, K), provider=provider, B=B,
             d=d, K=K, components=COMPONENTS, dtype="float32",
             eager="mmfast.ops.reference.mixture_log_prob")
