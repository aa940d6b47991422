"""Benchmarks of the fused latent terms of the masked objective (``gaussian_terms`` with both the
subset and the full posterior): samples z_S and z, log q(z_S|x_S), log p(z_S), log q(z|x) and
log q(z|x_S), with stl, one subset per row (``[B, d]`` posteriors), float32.

Providers (benchmarks/conftest.py): ``eager`` is the plain-PyTorch reference of mmfast.ops
(``reference.subset_terms`` + ``reference.full_terms``: the reparameterised samples and the
diagonal-Gaussian and mixture densities written with broadcasting, as a user would), ``compile``
is ``torch.compile`` of that function, ``mmfast`` the fused Triton kernels (GPU only). Priors:
N(0, I) and a C = 16 component Gaussian mixture.

Minimum bytes: forward reads the four posterior parameters ``[B, d]`` and both noises
``[K, B, d]``, writes both samples and the four ``[K, B]`` float32 log-densities; backward reads
the parameters, the noises and every upstream gradient, and writes the gradients of all inputs
(the prior's parameters are negligible).
On CPU one small case per prior runs (B = 256, d = 20, K = 4), so the suite cannot rot.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, provider_fn, run_case
from mmfast.ops import gaussian_terms
from mmfast.ops import reference as ref

COMPONENTS = 16

if HAS_CUDA:
    CASES = [(4096, d, K, prior) for d in (20, 64) for K in (1, 64)
             for prior in ("standard", "mixture")]
else:
    CASES = [(256, 20, 4, "standard"), (256, 20, 4, "mixture")]


def eager_terms(mu_s, logvar_s, eps_s, mu_f, logvar_f, eps_f, logits, prior_mu, prior_logvar):
    """The reference formulation: both parts of the masked objective's latent terms."""
    if logits is None:
        z_s, log_q_s, log_p_s = ref.subset_terms(mu_s, logvar_s, eps_s, stl=True)
    else:
        z_s, log_q_s, log_p_s = ref.subset_terms(mu_s, logvar_s, eps_s, logits, prior_mu,
                                                 prior_logvar, stl=True)
    z, log_q_f, log_q_fs = ref.full_terms(mu_f, logvar_f, eps_f, mu_s, logvar_s, stl=True)
    return z_s, log_q_s, log_p_s, z, log_q_f, log_q_fs


def mmfast_terms(mu_s, logvar_s, eps_s, mu_f, logvar_f, eps_f, logits, prior_mu, prior_logvar):
    prior = None if logits is None else (logits, prior_mu, prior_logvar)
    return tuple(gaussian_terms((mu_s, logvar_s), eps_s, (mu_f, logvar_f), eps_f, prior=prior,
                                stl=True))


def min_bytes(mode: str, B: int, d: int, K: int, item: int = 4) -> int:
    params, noise, densities = 4 * B * d * item, 2 * K * B * d * item, 4 * K * B * 4
    forward = params + noise + noise + densities                  # read, read, write z, write
    backward = (params + noise) + (noise + densities) + (params + noise)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


@pytest.mark.parametrize("B,d,K,prior", CASES)
def test_gaussian_terms(benchmark, provider, mode, B, d, K, prior):
    benchmark.group = f"gaussian_terms masked prior={prior} B={B} d={d} K={K} {mode}"
    g = torch.Generator().manual_seed(0)

    def make_inputs():
        grad = mode != "forward"

        def leaf(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_(grad)
        tensors = [leaf(B, d), leaf(B, d, scale=0.5), leaf(K, B, d),
                   leaf(B, d), leaf(B, d, scale=0.5), leaf(K, B, d)]
        if prior == "mixture":
            tensors += [leaf(COMPONENTS), leaf(COMPONENTS, d), leaf(COMPONENTS, d, scale=0.3)]
        else:
            tensors += [None, None, None]
        return tensors

    run_case(benchmark, provider_fn(provider, eager_terms, mmfast_terms), make_inputs, mode,
             min_bytes(mode, B, d, K), provider=provider, B=B, d=d, K=K, prior=prior,
             components=COMPONENTS if prior == "mixture" else 0, dtype="float32",
             eager="mmfast.ops.reference subset_terms + full_terms")
